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
from ctssl_core.checkpoint import FORMAT, CheckpointError, read_card, read_checkpoint
from ctssl_core.checkpoint import read_export  # noqa: F401 - an export read as a checkpoint
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


def load_exported(out_dir: str | Path):
    """Rebuild the encoder of an export folder (strict load) -> (encoder, card)."""
    from ctssl_core.checkpoint import load_encoder

    out = Path(out_dir)
    card_file = out / CARD
    if not card_file.is_file():
        raise CheckpointError(f"{out} has no {CARD}; export one with `ctssl export RUN_ID --out {out}`")
    enc, _ = load_encoder(out)
    return enc, read_card(card_file)
