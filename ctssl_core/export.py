"""Export a pretrained encoder so it can be shared: safetensors weights + a small JSON card.

The paper promised to share weights; a ``.pt`` pickle is neither safe to load
from strangers nor readable outside PyTorch. ``encoder.safetensors`` holds only
the encoder tensors (no optimiser, no head, no code); ``card.json`` says what
they are: strategy, encoder architecture and kwargs (enough to rebuild it with
``build_encoder``), the resolved training config, the data it saw (counts, no
patient identifiers) and its metrics. A ResNet that is exactly torchvision's/timm's also gets
``encoder.torchvision.safetensors`` under their key names (``interop.py``); the card's ``interop``
section says how to load it, or why there is none.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from ctssl_core.checkpoint import EXPORT_CARD as CARD
from ctssl_core.checkpoint import EXPORT_WEIGHTS as WEIGHTS
from ctssl_core.checkpoint import FORMAT, CheckpointError, read_checkpoint
from ctssl_core.paths import scrub_paths, store_paths

CARD_FORMAT = "ctssl-encoder-card/1"


def preprocessing(encoder_kwargs: dict) -> dict:
    """What a user of the exported weights must do to a CT slice before the encoder sees it: the HU
    windows (one input channel each, in this order) and the scaling -- without it the weights are
    applied to the wrong numbers."""
    from ctssl_core.ops import DEFAULT_WINDOWS, resolve_windows

    ws = resolve_windows(encoder_kwargs.get("windows") or DEFAULT_WINDOWS)
    return {"input": "axial CT slice in Hounsfield units (HU = stored value x RescaleSlope + RescaleIntercept)",
            "windows": [{"level": lv, "width": wd} for lv, wd in ws],
            "channels": len(ws),
            "scaling": "per window: x = clip((HU - (level - width / 2)) / width, 0, 1); channels stacked in the "
                       "order listed" + ("" if len(ws) > 1 else "; a 1-channel input is replicated to in_chans")}


def _interop(out: Path, state: dict, name: str | None, kwargs: dict) -> dict[str, Any]:
    """Write the torchvision/timm-named weights if the architecture maps exactly; the card's ``interop`` entry."""
    from safetensors.torch import save_file

    from ctssl_core.interop import WEIGHTS as TV_WEIGHTS, load_snippets, to_torchvision, torchvision_mismatch

    tv_file = out / TV_WEIGHTS
    why = torchvision_mismatch(name, kwargs)
    if why:
        tv_file.unlink(missing_ok=True)  # a re-export into the same folder must not leave an older run's file
        return {"file": None, "reason": why + "; load the weights with ctssl (card['load'])"}
    in_chans = int(state["stem.0.weight"].shape[1])  # (64, in_chans, 7, 7)
    save_file(to_torchvision(state, name, kwargs), str(tv_file),
              metadata={"format": CARD_FORMAT, "encoder": str(name), "keys": "torchvision/timm"})
    load = load_snippets(str(name), in_chans)
    return {"file": TV_WEIGHTS, "sha256": hashlib.sha256(tv_file.read_bytes()).hexdigest(), "in_chans": in_chans,
            "torchvision": {"model": f"torchvision.models.{name}", "load": load["torchvision"]},
            "timm": {"model": str(name), "load": load["timm"]},
            "note": "no fc weights: the model's pooled features equal ctssl's encoder.embed(x) on the same input"}


def _last_metrics(metrics_file: Path) -> dict[str, float]:
    """Last value of every metric in a run's metrics.jsonl (pure file read: no DuckDB)."""
    last: dict[str, float] = {}
    if not metrics_file.is_file():
        return last
    for line in metrics_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a half-written last line
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "wall_s"):
                last[k] = float(v)
    return last


def _run_row(store_root: Path, run_id: str) -> dict[str, Any]:
    """The run's row and downstream results if the store has them (read-only, short connection)."""
    from ctssl_core.db import StoreError
    from ctssl_core.results.store_api import run_card

    db = store_paths(store_root).db
    if not db.exists():
        return {}
    try:
        row, res = run_card(store_root, run_id)
    except (StoreError, Exception):  # noqa: BLE001 - the card is still useful without the row
        return {}
    out: dict[str, Any] = {}
    if row:
        out.update(status=row[0], code_version=row[1], wall_s=row[2], created_at=str(row[3]))
    if res:
        out["results"] = [{"task": t, "split": s, "metric": m, "value": v} for t, s, m, v in res]
    return out


def export_run(ref: str | Path, out_dir: str | Path, store_root: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/encoder.safetensors`` and ``out_dir/card.json`` for a run id or checkpoint path."""
    from safetensors.torch import save_file

    ckpt = read_checkpoint(ref, store_root)
    ckpt_path = Path(ckpt["_path"])
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    run_id = (ckpt.get("extra") or {}).get("export_of") or run_dir.name  # re-exporting an export keeps its run id
    root = store_paths(store_root).root
    cfg = dict(ckpt.get("config") or {})
    state = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["encoder"].items()}
    if not state:
        raise CheckpointError(f"{ckpt_path} holds an empty encoder; nothing to export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS
    name = ckpt.get("encoder_name")
    kwargs = ckpt.get("encoder_kwargs") or {}
    save_file(state, str(weights), metadata={"format": CARD_FORMAT, "encoder": str(name), "strategy": str(cfg.get("task"))})
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    # re-exporting an export (its folder used as a checkpoint): the folder has no metrics.jsonl and the
    # store may not hold the run, so the first card's metrics and run row are carried over, not dropped
    earlier = (ckpt.get("extra") or {}).get("export_card") or {}
    metrics = _last_metrics(run_dir / "metrics.jsonl") or dict(earlier.get("metrics") or {})
    card = {
        "format": CARD_FORMAT,
        "run_id": run_id,
        "strategy": cfg.get("task"),
        "encoder": {"name": name, "kwargs": ckpt.get("encoder_kwargs") or {},
                    "n_params": int(sum(v.numel() for k, v in state.items() if v.is_floating_point()))},
        "config": scrub_paths(cfg, root),
        "preprocessing": preprocessing(ckpt.get("encoder_kwargs") or {}),
        "data": {**dict(cfg.get("data") or {}), "store": Path(str(cfg.get("store", root))).name},
        "metrics": {"step": int(ckpt.get("step", 0)), **{k: v for k, v in metrics.items() if k != "step"}},
        "run": scrub_paths(_run_row(root, run_id) or dict(earlier.get("run") or {}), root),
        "weights": {"file": WEIGHTS, "sha256": digest, "bytes": weights.stat().st_size},
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "interop": _interop(out, state, name, kwargs),
        "load": f"build_encoder({name!r}, **card['encoder']['kwargs']).load_state_dict(safetensors.torch.load_file('{WEIGHTS}'))",
    }
    card_path = out / CARD
    card_path.write_text(json.dumps(card, indent=2, default=str))
    return weights, card_path


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
    card_file = weights.parent / CARD
    if not card_file.is_file():
        raise CheckpointError(f"{weights.parent} has no {CARD}; export one with "
                              f"`ctssl export RUN_ID --out {weights.parent}`")
    if weights.name != WEIGHTS:
        raise CheckpointError(f"{weights} is not ctssl's {WEIGHTS} (torchvision/timm-named weights load into those "
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


def load_exported(out_dir: str | Path):
    """Rebuild the encoder of an export folder (strict load) -> (encoder, card)."""
    from ctssl_core.checkpoint import load_encoder

    out = Path(out_dir)
    card_file = out / CARD
    if not card_file.is_file():
        raise CheckpointError(f"{out} has no {CARD}; export one with `ctssl export RUN_ID --out {out}`")
    enc, _ = load_encoder(out)
    return enc, read_card(card_file)
