"""Encoder weights under other libraries' key names: torchvision and timm ResNets.

Why: our ResNets are torchvision's ResNet v1.5 (7x7/2 stem + max-pool, stride on the 3x3 of a
bottleneck, 1x1 conv + BN shortcut) with our own module names (``stem.0``, ``stages.i.j.down``),
which no other library loads. Renaming the keys is enough to load them into
``torchvision.models.resnetN`` (with ``conv1`` built for ``in_chans``) and into
``timm.create_model('resnetN', in_chans=..., num_classes=0)``, which share one naming.

Only an exact architectural match is mapped. An encoder whose shape differs (``tiny``, a
``width`` other than 1, another stem) is refused with the reason: a renamed state that loads
but computes something else would be worse than none. Pure dict work: torchvision and timm
are not imported here (tests load the result into both).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from ctssl_core.config import ConfigError

# ctssl registry key -> the torchvision / timm model of the same architecture
TORCHVISION_NAMES: dict[str, str] = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50"}
WEIGHTS = "encoder.torchvision.safetensors"


class InteropError(ConfigError):
    """The encoder has no exact torchvision/timm counterpart; the message says why."""


def torchvision_mismatch(name: str | None, kwargs: Mapping[str, Any]) -> str | None:
    """None when encoder ``name`` built with ``kwargs`` is exactly torchvision's/timm's model of that name,
    else the reason it is not (used in the export card and the CLI message)."""
    if name not in TORCHVISION_NAMES:
        return (f"encoder {name!r} has no torchvision/timm counterpart (only {sorted(TORCHVISION_NAMES)} do; "
                f"'tiny' has 1 block per stage, 16-128 channels and a 3x3 stem without max-pool)")
    diffs = []
    if float(kwargs.get("width", 1.0)) != 1.0:
        diffs.append(f"width={kwargs['width']} (torchvision/timm have width 1: 64-128-256-512 channels)")
    if kwargs.get("channels") is not None and tuple(kwargs["channels"]) != (64, 128, 256, 512):
        diffs.append(f"channels={list(kwargs['channels'])} (torchvision/timm: 64, 128, 256, 512)")
    if kwargs.get("stem_channels") not in (None, 64):
        diffs.append(f"stem_channels={kwargs['stem_channels']} (torchvision/timm: 64)")
    if not kwargs.get("stem_pool", True):
        diffs.append("stem_pool=False (torchvision/timm: 7x7 stride-2 stem followed by a max-pool)")
    if diffs:
        return f"{name} built with " + "; ".join(diffs) + ", so it differs from torchvision's/timm's " + name
    return None


_STAGE = re.compile(r"^stages\.(\d+)\.(\d+)\.(.*)$")
_STEM = {"stem.0.": "conv1.", "stem.1.": "bn1."}


def _rename(key: str) -> str:
    for ours, theirs in _STEM.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    m = _STAGE.match(key)
    if m:
        stage, block, rest = m.groups()
        if rest.startswith("down."):
            rest = "downsample." + rest[len("down."):]
        return f"layer{int(stage) + 1}.{block}.{rest}"
    raise InteropError(f"encoder key {key!r} has no torchvision/timm name; this state is not a ctssl ResNet")


def to_torchvision(state: Mapping[str, Any], name: str | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (a ctssl ResNet state dict) under torchvision/timm key names, without ``fc`` (load it
    into a model whose ``fc`` is ``Identity``: torchvision ``model.fc = nn.Identity()``, timm
    ``num_classes=0``). Raises InteropError when the architecture has no exact counterpart."""
    why = torchvision_mismatch(name, kwargs)
    if why:
        raise InteropError(why)
    out = {_rename(k): v for k, v in state.items()}
    if len(out) != len(state):  # two keys renamed to one would silently drop weights
        raise InteropError(f"{name}: the key mapping is not one-to-one; nothing written")
    return out


def load_snippets(name: str, in_chans: int, file: str = WEIGHTS) -> dict[str, str]:
    """How to load the renamed weights in torchvision and timm (for the card)."""
    tv = TORCHVISION_NAMES[name]
    return {
        "torchvision": (f"m = torchvision.models.{tv}(weights=None); "
                        f"m.conv1 = torch.nn.Conv2d({in_chans}, 64, 7, 2, 3, bias=False); m.fc = torch.nn.Identity(); "
                        f"m.load_state_dict(safetensors.torch.load_file('{file}'))"),
        "timm": (f"m = timm.create_model('{tv}', in_chans={in_chans}, num_classes=0); "
                 f"m.load_state_dict(safetensors.torch.load_file('{file}'))"),
    }
