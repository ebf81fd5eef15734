"""Encoder registry.

``ENCODERS`` maps a registry key to a constructor; every encoder honours the
contract in ``models/base.py`` (``forward_features``, ``feature_channels``,
``feature_strides``, ``embed``, ``embed_dim``, ``in_chans``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ctssl_core.config import ConfigError
from ctssl_core.models.base import Encoder
from ctssl_core.models.heads import ClassifierHead, UNetDecoder, build_dense_head, dense_forward
from ctssl_core.models.resnet import ResNetEncoder, resnet18, resnet34, resnet50, tiny
from ctssl_core.models.vqvae import VQDecoderHead, VQVAEEncoder, paper

ENCODERS: dict[str, Callable[..., Encoder]] = {
    "tiny": tiny,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "paper": paper,
}


def _accepted_kwargs(fn: Callable[..., Any]) -> set[str]:
    names: set[str] = set()
    for f in (fn, ResNetEncoder.__init__ if fn is not paper else VQVAEEncoder.__init__):
        for p in inspect.signature(f).parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self":
                names.add(p.name)
    names.discard("block")
    names.discard("layers")
    return names


def build_encoder(name: str, windows: Any = None, **kw: Any) -> Encoder:
    """Build encoder ``name`` for inputs windowed by ``windows`` (a preset of ``ops.WINDOWS`` or
    (level, width) pairs; default: the paper's single soft-tissue window).

    With one window, ``in_chans`` defaults to 1 (3 grey copies for ``paper``, as the paper did);
    with several, each window is one input channel, so ``in_chans`` = the number of windows. The
    windows are stored in ``encoder.kwargs``, so a checkpoint rebuilds with the view it was trained
    on. Unknown names or keyword arguments raise ConfigError listing the valid ones."""
    from ctssl_core.ops import DEFAULT_WINDOWS, resolve_windows

    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    fn = ENCODERS[name]
    valid = _accepted_kwargs(fn)
    bad = sorted(set(kw) - valid)
    if bad:
        raise ConfigError(f"unknown option(s) {bad} for encoder {name!r}; valid: {sorted(valid) + ['windows']}")
    ws = resolve_windows(DEFAULT_WINDOWS if windows is None else windows)
    if len(ws) > 1:
        if kw.setdefault("in_chans", len(ws)) != len(ws):
            raise ConfigError(f"encoder {name!r}: in_chans={kw['in_chans']} but {len(ws)} windows give {len(ws)} "
                              f"input channels; drop in_chans (it follows the windows)")
    encoder = fn(**kw)
    encoder.windows = ws
    # identity read by checkpoint.encoder_identity: rebuild with build_encoder(registry_name, **kwargs)
    encoder.registry_name = name
    encoder.kwargs = {**dict(getattr(encoder, "config", None) or kw), "windows": [list(w) for w in ws]}
    return encoder


def windows_mismatch(encoder: Encoder, windows: Any) -> str | None:
    """None when ``windows`` (None: whatever the encoder has) is the view ``encoder`` was trained on, else
    the sentence saying both; fine-tuning and embedding a checkpoint raise it in their own error type."""
    from ctssl_core.ops import resolve_windows

    if windows is None or resolve_windows(windows) == encoder.windows:
        return None
    return f"on windows {[list(w) for w in encoder.windows]}, not {[list(w) for w in resolve_windows(windows)]}"


__all__ = [
    "ENCODERS", "build_encoder", "Encoder", "ClassifierHead", "UNetDecoder", "build_dense_head",
    "dense_forward", "VQDecoderHead", "VQVAEEncoder", "ResNetEncoder",
]
