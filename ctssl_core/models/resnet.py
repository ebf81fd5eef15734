"""ResNet-style 2D encoders (He et al. 2016) for 1-channel CT slices: 18/34/50 and ``tiny``.

Why ResNets: they are the usual 2D backbone of CT SSL work, pair naturally with a
U-Net decoder for the dense pretext tasks (masked region, next slice, denoise),
and run 5-20x faster than the paper's VQ-VAE per image (DESIGN.md GPU table).
``width`` scales every channel count so a lighter encoder can be measured
against the paper's backbone. Only Conv/BatchNorm/ReLU/pooling, so the models
are channels_last friendly (``model.to(memory_format=torch.channels_last)``).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ctssl_core.config import ConfigError
from ctssl_core.models.base import Encoder


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.bn2.weight)  # each block starts as identity: stable early training
        self.relu = nn.ReLU(inplace=True)
        self.down = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.down(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.bn3.weight)
        self.relu = nn.ReLU(inplace=True)
        self.down = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.down(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNetEncoder(Encoder):
    """Stem + 4 stages. ``forward_features`` returns the stem output (stride 2) and each
    stage output (strides 4, 8, 16, 32 with the max-pool stem; 2, 4, 8, 16 without).

    The stem map is only returned when it has a stride of its own (i.e. with the
    max-pool), so strides are strictly increasing.
    """

    def __init__(self, block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2),
                 channels: Sequence[int] = (64, 128, 256, 512), width: float = 1.0, in_chans: int = 1,
                 stem_channels: int | None = None, stem_pool: bool = True):
        super().__init__()
        if block not in BLOCKS:
            raise ConfigError(f"unknown block {block!r}; choose one of {sorted(BLOCKS)}")
        if len(layers) != len(channels) or not layers:
            raise ConfigError(f"layers {tuple(layers)} and channels {tuple(channels)} must have the same non-zero length")
        if width <= 0:
            raise ConfigError(f"width must be > 0, got {width}")
        if in_chans < 1:
            raise ConfigError(f"in_chans must be >= 1, got {in_chans}")
        blk = BLOCKS[block]
        scale = lambda c: max(8, int(round(c * width)))  # noqa: E731
        self.in_chans = in_chans
        stem_c = scale(stem_channels if stem_channels is not None else channels[0])
        if stem_pool:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_c, 7, 2, 3, bias=False), nn.BatchNorm2d(stem_c),
                                      nn.ReLU(inplace=True))
            self.pool = nn.MaxPool2d(3, 2, 1)
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_c, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_c),
                                      nn.ReLU(inplace=True))
            self.pool = nn.Identity()
        self.return_stem = stem_pool
        stages, cin = [], stem_c
        feat_c = [stem_c] if stem_pool else []
        feat_s = [2] if stem_pool else []
        stride_now = 4 if stem_pool else 2
        for i, (n, c) in enumerate(zip(layers, channels)):
            planes = scale(c)
            stride = 1 if i == 0 else 2
            if i > 0:
                stride_now *= 2
            blocks = [blk(cin, planes, stride)]
            cin = planes * blk.expansion
            blocks += [blk(cin, planes, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            feat_c.append(cin)
            feat_s.append(stride_now)
        self.stages = nn.ModuleList(stages)
        self.feature_channels = feat_c
        self.feature_strides = feat_s
        self.embed_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.adapt_input(x)
        s = self.stem(x)                                          # (B, C0, H/2, W/2)
        feats = [s] if self.return_stem else []
        h = self.pool(s)
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats


def resnet18(width: float = 1.0, in_chans: int = 1, **kw) -> ResNetEncoder:
    return ResNetEncoder("basic", (2, 2, 2, 2), width=width, in_chans=in_chans, **kw)


def resnet34(width: float = 1.0, in_chans: int = 1, **kw) -> ResNetEncoder:
    return ResNetEncoder("basic", (3, 4, 6, 3), width=width, in_chans=in_chans, **kw)


def resnet50(width: float = 1.0, in_chans: int = 1, **kw) -> ResNetEncoder:
    return ResNetEncoder("bottleneck", (3, 4, 6, 3), width=width, in_chans=in_chans, **kw)


def tiny(width: float = 1.0, in_chans: int = 1, **kw) -> ResNetEncoder:
    """One basic block per stage, 16-32-64-128 channels, 3x3 stride-2 stem without max-pool:
    features at strides 2, 4, 8, 16. For CPU tests and the quick profile."""
    kw.setdefault("stem_pool", False)
    return ResNetEncoder("basic", (1, 1, 1, 1), channels=(16, 32, 64, 128), width=width, in_chans=in_chans, **kw)
