"""Pretext (self-supervised) task registry.

``PRETEXT`` maps the snake_case key used in YAML, DuckDB and the UI to the task's
frozen dataclass; ``make_pretext(name, **hparams)`` fills it strictly.
"""

from __future__ import annotations

from typing import Any

from ctssl_core.config import ConfigError, build
from ctssl_core.pretext.composite import Composite, CompositeBatch
from ctssl_core.pretext.denoise import Denoise
from ctssl_core.pretext.flip import Flip
from ctssl_core.pretext.masked_region import MaskedRegion
from ctssl_core.pretext.next_slice import NextSlice
from ctssl_core.pretext.rotation import Rotation

PRETEXT: dict[str, type] = {
    "masked_region": MaskedRegion,
    "next_slice": NextSlice,
    "rotation": Rotation,
    "flip": Flip,
    "denoise": Denoise,
    "composite": Composite,
}


def strategies() -> tuple[str, ...]:
    """The pretraining strategies a benchmark runs by default: every registered task that is one
    strategy of its own (``Composite`` combines others, so it is opt-in). Read at call time, so a task
    registered later (``PRETEXT["mine"] = Mine``) is picked up by the benchmark, CLI and jobs form."""
    return tuple(k for k, cls in PRETEXT.items() if getattr(cls, "default_strategy", True))


def make_pretext(name: str, **hparams: Any) -> Any:
    """Build pretext task ``name`` from keyword hyperparameters; unknown names/keys -> ConfigError."""
    if name not in PRETEXT:
        raise ConfigError(f"unknown pretext task {name!r}; choose one of {sorted(PRETEXT)}")
    return build(PRETEXT[name], hparams, where=f"{name}.")


__all__ = ["PRETEXT", "make_pretext", "strategies", "CompositeBatch"]
