"""Checkpoints: encoder and head saved apart, with everything a resume needs.

A checkpoint is one ``torch.save`` dict::

    {"format": 1, "encoder": state, "encoder_name": "resnet18", "encoder_kwargs": {...},
     "head": state, "optimizer": state, "scheduler": state, "step": int,
     "rng": {...}, "loader": {...}, "config": {...resolved run config...}, "extra": {...}}

The encoder is stored on its own so that fine-tuning, probing and export load
it without knowing the pretext head. Writes are atomic (temp file + rename) so
that a crash or SIGTERM mid-save never leaves a half-written ``last.pt``.
Loading an encoder is strict: missing or unexpected keys and an architecture
mismatch fail loudly with the names, because a silently half-loaded encoder
makes every downstream number wrong.

Reading uses ``torch.load(weights_only=True)``: a checkpoint holds only tensors
and plain values (dicts, lists, tuples, str, int, float, bool, None), so a file
whose pickle would construct arbitrary objects (and so could run code) is
refused instead of executed. numpy's RNG state is therefore stored as plain
values plus a tensor (``_numpy_state_plain``); checkpoints written before that
(a numpy state tuple holding an ``ndarray``) still load, through a scoped
allow-list of exactly the numpy array globals such a tuple needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ctssl_core.config import ConfigError
from ctssl_core.db import StoreFull, is_disk_full
from ctssl_core.paths import store_paths

FORMAT = 1
LAST = "last.pt"
EXPORT_WEIGHTS, EXPORT_CARD = "encoder.safetensors", "card.json"  # an export folder (export.py writes it)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod  # type: ignore[assignment]
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def encoder_identity(encoder: nn.Module) -> tuple[str, dict[str, Any]]:
    """(registry name, constructor kwargs) of an encoder, as far as it tells us."""
    enc = unwrap(encoder)
    name = getattr(enc, "name", None) or getattr(enc, "registry_name", None) or type(enc).__name__
    kwargs = getattr(enc, "kwargs", None) or getattr(enc, "config", None) or {}
    if not isinstance(kwargs, Mapping):
        try:
            import dataclasses

            kwargs = dataclasses.asdict(kwargs)
        except TypeError:
            kwargs = {}
    return str(name), {**dict(kwargs), **_windows_kwarg(enc)}


def _windows_kwarg(enc: nn.Module) -> dict[str, Any]:
    """The input windows an encoder was built for, as a JSON-able build_encoder kwarg (empty for a
    module that is not a ctssl encoder)."""
    ws = getattr(enc, "windows", None)
    return {"windows": [list(w) for w in ws]} if ws else {}


# ---------------- RNG ----------------
def _numpy_state_plain(state: tuple[Any, ...]) -> dict[str, Any]:
    """numpy's legacy RNG state tuple as values ``weights_only`` loading accepts (no ndarray)."""
    kind, keys, pos, has_gauss, cached = state
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # (624,) uint32 values
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_tuple(state: Any) -> tuple[Any, ...]:
    """Inverse of ``_numpy_state_plain``; a tuple (older checkpoints) passes through."""
    if not isinstance(state, Mapping):
        return tuple(state)
    keys = np.asarray(state["keys"].numpy() if isinstance(state["keys"], torch.Tensor) else state["keys"]).astype(np.uint32)
    return (state["kind"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a training step touches: python, numpy, torch CPU/CUDA, named generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        saved = state.get("generators", {}).get(k)
        if saved is not None:
            g.set_state(saved)


# ---------------- save / load ----------------
def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``.

    A failed write removes its temp file: on a full disk the half-written temp file (as large as
    the checkpoint could get) kept the disk full, so the run could not even record that it had
    failed and its job never ended. ``torch.save`` gets a Python file, not a path, because with
    a path a full disk surfaces only as "unexpected pos ..." from torch's C++ writer; through a
    Python file the OSError (ENOSPC) stays in the exception chain, and a full disk is raised as
    ``StoreFull`` (exit 2) saying what to do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, Exception) and is_disk_full(e):
            raise StoreFull(_disk_full_message(path)) from e
        raise
    return path


def _disk_full_message(path: Path) -> str:
    run = path.parent.parent.name if path.parent.name == "checkpoints" else None
    how = (f"`ctssl pretrain --resume {run}` for a pretraining, `ctssl jobs resume JOB_ID` for a job"
           if run else "run the command again")
    kept = "the previous checkpoint there is unchanged" if path.is_file() else "no earlier checkpoint was kept"
    return (f"no space left on the disk holding {path.parent}: checkpoint {path.name} was not written ({kept}). "
            f"Free space on that disk, then continue ({how}).")


def save_checkpoint(
    path: str | Path,
    encoder: nn.Module,
    head: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    sched: Any,
    step: int,
    rng: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
    loader: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    name, kwargs = encoder_identity(encoder)
    cfg = dict(config or {})
    name = cfg.get("encoder", name) if isinstance(cfg.get("encoder"), str) else name
    kwargs = {**dict(cfg.get("encoder_params", kwargs) or kwargs), **_windows_kwarg(unwrap(encoder))}
    obj = {
        "format": FORMAT,
        "encoder": unwrap(encoder).state_dict(),
        "encoder_name": name,
        "encoder_kwargs": kwargs,
        "head": unwrap(head).state_dict() if head is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": sched.state_dict() if sched is not None else None,
        "step": int(step),
        "rng": dict(rng) if rng is not None else None,
        "loader": dict(loader) if loader is not None else None,
        "config": cfg,
        "extra": dict(extra or {}),
    }
    return atomic_save(obj, path)


def resolve_checkpoint(ref: str | Path, store_root: str | Path | None = None) -> Path:
    """A checkpoint file from a path, a run folder, an export folder (``ctssl export``: its
    ``encoder.safetensors``) or a run id in the store."""
    p = Path(ref)
    candidates = [p, p / "checkpoints" / LAST, p / LAST]
    if (p / EXPORT_CARD).is_file():
        candidates.append(p / EXPORT_WEIGHTS)
    sp = store_paths(store_root)
    candidates += [sp.run_dir(str(ref)) / "checkpoints" / LAST]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(
        f"no checkpoint found for {str(ref)!r}: looked for a file, <dir>/checkpoints/{LAST} and "
        f"{sp.run_dir(str(ref)) / 'checkpoints' / LAST}. Pass a checkpoint path, an export folder (`ctssl export`) "
        f"or the id of a run that has saved one (`ctssl pretrain` saves every ckpt_every steps)."
    )


def _legacy_numpy_globals() -> list[Any]:
    """The globals a pickled numpy RNG state tuple needs (checkpoints from before ``_numpy_state_plain``)."""
    core = getattr(np, "_core", None) or np.core   # numpy >= 2 renamed core -> _core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(ref: str | Path, store_root: str | Path | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a file that needs arbitrary objects is refused.
    An export folder (or its ``encoder.safetensors``) reads as a checkpoint with an encoder and no
    head/optimiser, so it works as ``--init`` / ``--checkpoint`` like a run."""
    path = resolve_checkpoint(ref, store_root)
    if path.suffix == ".safetensors":  # an export folder's weights: no pickle at all
        return read_export(path)
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]   # torch names the refused global
        if not unsafe:
            raise CheckpointError(f"cannot read checkpoint {path}: {e}. Is it a ctssl checkpoint (torch.save of a dict)?") from e
        first = unsafe[0][:300]
        raise CheckpointError(
            f"refused to load checkpoint {path}: it contains Python objects beyond tensors and plain values, "
            f"which could run code when unpickled ({first}). ctssl checkpoints never do; use a checkpoint "
            f"written by `ctssl pretrain` / `ctssl finetune`, or an export folder's safetensors weights."
        ) from e
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CheckpointError(f"cannot read checkpoint {path}: {e}. Is it a ctssl checkpoint (torch.save of a dict)?") from e
    if not isinstance(obj, dict) or "encoder" not in obj:
        raise CheckpointError(f"{path} is not a ctssl checkpoint (no 'encoder' state); use one written by `ctssl pretrain`")
    obj["_path"] = str(path)
    return obj


def load_encoder_state(encoder: nn.Module, ckpt: Mapping[str, Any], expected_name: str | None = None) -> None:
    """Load ``ckpt['encoder']`` into ``encoder`` strictly, or raise naming what differs."""
    have_name = ckpt.get("encoder_name")
    want = expected_name or getattr(unwrap(encoder), "name", None)
    where = ckpt.get("_path", "the checkpoint")
    if have_name and want and have_name != want:
        raise CheckpointError(
            f"checkpoint is {have_name}, you asked for {want} ({where}). "
            f"Set encoder={have_name} or pick a checkpoint trained with {want}."
        )
    target = unwrap(encoder)
    state = ckpt["encoder"]
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        parts = [f"checkpoint {where} does not fit this {want or type(target).__name__} encoder"]
        if have_name:
            parts.append(f"(checkpoint architecture {have_name}, kwargs {ckpt.get('encoder_kwargs', {})})")
        if missing:
            parts.append(f"missing keys [{show(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{show(unexpected)}]")
        if shape:
            parts.append("shape mismatch " + ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shape[:5]))
        parts.append("Build the encoder with the checkpoint's name and kwargs (load_encoder does this).")
        raise CheckpointError("; ".join(parts))
    target.load_state_dict(state, strict=True)


def load_encoder(path: str | Path, store_root: str | Path | None = None, expected: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the encoder a checkpoint was trained with and load its weights strictly.

    ``path`` may be a file, a run folder or a run id in the store. ``expected``
    (an encoder registry key) makes a mismatch an error instead of a surprise.
    Returns ``(encoder, config)`` where config is the resolved run config.
    """
    ckpt = read_checkpoint(path, store_root)
    name = ckpt.get("encoder_name")
    if expected and name and expected != name:
        raise CheckpointError(f"checkpoint is {name}, you asked for {expected} ({ckpt['_path']}). Use encoder={name}.")
    from ctssl_core.models import build_encoder  # lazy: models may be heavy

    try:
        encoder = build_encoder(name, **(ckpt.get("encoder_kwargs") or {}))
    except KeyError as e:
        raise CheckpointError(f"checkpoint {ckpt['_path']} uses encoder {name!r}, which this ctssl does not know ({e})") from e
    load_encoder_state(encoder, ckpt, expected_name=name)
    return encoder, dict(ckpt.get("config") or {})


# ------------------------------------------------------------------ export folders read as checkpoints
# (here, not in export.py: reading is the checkpoint layer's, and export.py builds on it)


def _card_error(card_file: Path, field: str, want: str) -> CheckpointError:
    return CheckpointError(f"{card_file}: field {field!r} {want}; this is not a card `ctssl export` writes -- export "
                           f"the run again with `ctssl export RUN_ID --out {card_file.parent}`")


def read_card(card_file: Path) -> dict[str, Any]:
    """An export's card, checked field by field: a malformed card (hand-edited, truncated, another tool's)
    is refused with the file and the field named, never a bare KeyError / TypeError deep in loading.

    Required: ``encoder.name`` (text), ``encoder.kwargs`` (a mapping), ``weights.sha256`` (64 hex digits:
    without it the weights cannot be checked, so they are refused, not trained on). Optional but typed
    when present: ``run_id`` (text), ``config``, ``metrics`` and ``run`` (mappings), ``metrics.step``
    (a whole number)."""
    import re

    try:
        card = json.loads(card_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{card_file} is not readable JSON ({e}); export the run again with "
                              f"`ctssl export RUN_ID --out {card_file.parent}`") from e
    if not isinstance(card, dict):
        raise _card_error(card_file, "(top level)", f"must be a JSON object, not {type(card).__name__}")
    enc = card.get("encoder")
    if not isinstance(enc, dict):
        raise _card_error(card_file, "encoder", "is missing or not an object")
    if not isinstance(enc.get("name"), str) or not enc["name"]:
        raise _card_error(card_file, "encoder.name", "is missing or not text (the registry name, e.g. 'tiny')")
    if not isinstance(enc.get("kwargs", {}), (dict, type(None))):
        raise _card_error(card_file, "encoder.kwargs", "must be an object of build_encoder keyword arguments")
    weights = card.get("weights")
    sha = weights.get("sha256") if isinstance(weights, dict) else None
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _card_error(card_file, "weights.sha256", "is missing or not a sha256 hex digest, so the weights "
                                                       "cannot be checked and are refused")
    for key in ("config", "metrics", "run"):
        if not isinstance(card.get(key, {}), (dict, type(None))):
            raise _card_error(card_file, key, "must be an object")
    if not isinstance(card.get("run_id", ""), (str, type(None))):
        raise _card_error(card_file, "run_id", "must be text")
    step = (card.get("metrics") or {}).get("step", 0)
    if isinstance(step, bool) or not (isinstance(step, int) or (isinstance(step, float) and step.is_integer())):
        raise _card_error(card_file, "metrics.step", "must be a whole number")
    return card


def read_export(weights: str | Path) -> dict[str, Any]:
    """An export's ``encoder.safetensors`` (with ``card.json`` beside it) as the dict ``read_checkpoint``
    returns: the encoder state, its name and kwargs, the run config and step; no head or optimiser.
    The weights must match the card's sha256 (``read_card``: a card without one is refused), so a
    swapped or damaged file is refused, not trained on. ``extra`` carries the card's run id, metrics
    and run row, so exporting this export again keeps them."""
    from safetensors.torch import load_file

    weights = Path(weights)
    card_file = weights.parent / EXPORT_CARD
    if not card_file.is_file():
        raise CheckpointError(f"{weights.parent} has no {EXPORT_CARD}; export one with "
                              f"`ctssl export RUN_ID --out {weights.parent}`")
    if weights.name != EXPORT_WEIGHTS:
        raise CheckpointError(f"{weights} is not ctssl's {EXPORT_WEIGHTS} (torchvision/timm-named weights load into those "
                              f"libraries, not ctssl); pass the export folder {weights.parent}")
    card = read_card(card_file)
    enc_card = card["encoder"]
    if hashlib.sha256(weights.read_bytes()).hexdigest() != card["weights"]["sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 in {card_file}: the file was changed or damaged; "
                              f"export it again")
    return {"format": FORMAT, "encoder": load_file(str(weights)), "encoder_name": enc_card["name"],
            "encoder_kwargs": enc_card.get("kwargs") or {}, "head": None, "optimizer": None, "scheduler": None,
            "step": int((card.get("metrics") or {}).get("step", 0)), "rng": None, "loader": None,
            "config": dict(card.get("config") or {}), "_path": str(weights),
            "extra": {"export_of": card.get("run_id"),
                      "export_card": {"metrics": card.get("metrics") or {}, "run": card.get("run") or {}}}}
