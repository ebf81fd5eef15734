"""Pretraining, wired: config -> store -> task -> fit -> results.

``run_pretrain`` is what ``ctssl pretrain`` (and the job worker) call. It
resolves the config strictly (profile ``pretrain:`` section, then a YAML file,
then ``--set`` overrides), opens the slice store (train-split patients only,
so downstream evaluation never sees a pretraining patient), builds the pretext
task and encoder, records a ``runs`` row, trains with the one loop in
``train.py`` and records the outcome. Checkpoints go to
``<store>/runs/<run_id>/checkpoints/last.pt``; metrics to
``runs/<run_id>/metrics.jsonl`` (``RunLogger``; the store merges it, see ``results/runfolder.py``).

Under ``torchrun`` every rank trains on its shard; rank 0 alone writes the
store.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np

from ctssl_core.config import ConfigError, build, config_hash, load_profile, merge, parse_overrides, to_dict
from ctssl_core.paths import store_paths
from ctssl_core.train import TrainConfig


@dataclass(frozen=True)
class PretrainConfig:
    task: str = "masked_region"                       # PRETEXT key
    encoder: str = "tiny"                             # ENCODERS key
    encoder_params: dict = field(default_factory=dict)  # e.g. {width: 0.5}
    windows: Any = "paper"                            # HU windows of the model input, one channel each:
                                                      # an ops.WINDOWS preset or [[level, width], ...]
    tasks: dict = field(default_factory=dict)         # per-task hyperparameters {task: {hparam: value}}
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, batch_size=32, lr=1e-3, warmup_steps=20, ckpt_every=100, log_every=10, image_size=64))
    split: Literal["train", "pool", "all"] = "train"  # pretrain on train-split patients (default), on the
                                                      # unlabelled pool (needs pool > 0), or on all
    split_seed: int = 0
    pool: float = 0.0                                 # fraction of patients set apart as the unlabelled pool
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # of the labelled cohort (part of the split scheme)
    max_slices: int = 0                               # cap on the slices used (0 = all), for quick runs
    probe_every: int = 0                              # online linear probe (PE AUROC on held-out slices) every N steps; 0 = off
    probe_slices: int = 256                           # held-out labelled slices the probe embeds


def pretrain_hash(cfg: PretrainConfig) -> str:
    """A pretraining's identity: the hash of its resolved config, stored as ``runs.unit_hash``. A benchmark
    finds a finished pretraining by it (``plan.PretrainUnit``), whoever started the run."""
    return config_hash(to_dict(cfg), 16)


@dataclass
class PretrainResult:
    run_id: str
    run_dir: Path
    checkpoint: Path | None
    steps: int
    first_loss: float | None
    final_loss: float | None
    status: str
    n_slices: int


def _yaml_section(data: Mapping[str, Any]) -> dict[str, Any]:
    """A YAML file may hold a full profile (with a ``pretrain:`` section) or just that section."""
    return dict(data.get("pretrain", {})) if "pretrain" in data else {k: v for k, v in data.items() if k != "profile"}


def _route_train_keys(mapping: dict[str, Any]) -> dict[str, Any]:
    """Let ``--set steps=5`` mean ``train.steps=5``: top-level keys that are TrainConfig fields move under train."""
    own = {f.name for f in dataclasses.fields(PretrainConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = dict(mapping)
    for k in list(out):
        if k not in own and k in train_fields:
            out.setdefault("train", {})
            out["train"] = {**out["train"], k: out.pop(k)}
        elif k not in own:
            import difflib

            close = difflib.get_close_matches(k, sorted(own | train_fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {k!r} for pretrain.{hint} Valid keys: {', '.join(sorted(own))}; "
                              f"training keys (train.KEY or KEY): {', '.join(sorted(train_fields))}")
    return out


def resolve_config(task: str | None = None, profile: str | None = None, config_path: str | Path | None = None,
                   overrides: tuple[str, ...] | list[str] = (), base: Mapping[str, Any] | None = None) -> PretrainConfig:
    """Profile -> YAML -> overrides -> --task, strictly (unknown keys name the valid ones)."""
    data: dict[str, Any] = dict(base or {})
    if profile:
        data = merge(data, _yaml_section(load_profile(profile)))
    if config_path:
        data = merge(data, _yaml_section(load_profile(Path(config_path))))
    data = merge(_route_train_keys(data), _route_train_keys(parse_overrides(overrides)))
    if task:
        data["task"] = task
    if "train" in data and isinstance(data["train"], Mapping):
        default_train = to_dict(PretrainConfig().train)
        data["train"] = {**default_train, **data["train"]}
    cfg = build(PretrainConfig, data)
    from ctssl_core.pretext import PRETEXT

    if cfg.task not in PRETEXT:
        import difflib

        close = difflib.get_close_matches(cfg.task, list(PRETEXT), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown task {cfg.task!r}.{hint} Choose one of {sorted(PRETEXT)}")
    return cfg


def default_profile() -> str | None:
    """'quick' when the profile file exists, else the dataclass defaults."""
    from ctssl_core.config import profile_names

    return "quick" if "quick" in profile_names() else None


def train_positions(store: Any, root: Path, cfg: PretrainConfig) -> np.ndarray:
    """Global slice ids of the slices pretraining may use (train-split patients), capped by max_slices."""
    ids = np.asarray(store.slice_ids, dtype=np.int64)
    if cfg.split == "pool" and not cfg.pool:
        raise ConfigError("split=pool needs a pool: set pool to the fraction of patients set apart (e.g. 0.5)")
    if cfg.split != "all" and getattr(store, "patients", None) is not None and "patient_key" in store.patients:
        from ctssl_core.data.splits import get_or_create_splits

        split_of = get_or_create_splits(root, cfg.split_seed, cfg.split_fractions, pool=cfg.pool)
        keys = store.patients["patient_key"].to_numpy()
        in_train = np.array([split_of.get(k) == cfg.split for k in keys], dtype=bool)  # per patient row
        ids = ids[in_train[np.asarray(store.patient_idx)]]
        if len(ids) == 0:
            raise ConfigError(f"the {cfg.split} split (seed {cfg.split_seed}) of {root} has no slices; ingest more "
                              f"patients or pretrain on everything with --set split=all")
    if cfg.max_slices and len(ids) > cfg.max_slices:
        ids = np.sort(np.random.default_rng(cfg.split_seed).choice(ids, cfg.max_slices, replace=False))
    return ids


def heldout_pe_ids(store: Any, root: Path, cfg: PretrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(slice ids, pe labels) of labelled slices of val+test patients, at most ``probe_slices``, both classes."""
    if getattr(store, "patients", None) is None or "patient_key" not in store.patients:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    from ctssl_core.data.splits import get_or_create_splits

    split_of = get_or_create_splits(root, cfg.split_seed, cfg.split_fractions, pool=cfg.pool)
    keys = store.patients["patient_key"].to_numpy()
    held = np.array([split_of.get(k) in ("val", "test") for k in keys], dtype=bool)[np.asarray(store.patient_idx)]
    pe = np.asarray(store.labels("pe"), dtype=np.float64)
    ok = held & np.isfinite(pe)
    ids = np.asarray(store.slice_ids, dtype=np.int64)[ok]
    y = pe[ok]
    if len(ids) > cfg.probe_slices:
        pick = np.sort(np.random.default_rng(cfg.split_seed).choice(len(ids), cfg.probe_slices, replace=False))
        ids, y = ids[pick], y[pick]
    return ids, y.astype(np.float32)


def input_geometry(task: Any, image_size: int, crop: int) -> tuple[int | None, int | None]:
    """(image_size, crop) the loader uses for ``task``: the configured ones, except that a task that
    needs the whole slice (``task.whole_slice``: flip, rotation) gets the slice resized to the crop
    side instead of a random crop -- same pixels per step, and the global cue stays in view."""
    if crop and task.whole_slice:
        return int(crop), None
    return (int(image_size) or None), (int(crop) or None)


def make_online_probe(store: Any, ids: np.ndarray, y: np.ndarray, patient_idx: np.ndarray, image_size: int | None,
                      device: Any) -> Callable[[Any, int], dict[str, float]]:
    """A cheap linear probe of PE on held-out slices while pretraining: embed them, score them out of fold
    with the study's linear probe (``probes.binary_oof``: nested-CV ridge, folds by patient where there
    are enough), AUROC. Cost: one no-grad pass over ``len(ids)`` slices plus two small ridge fits."""
    import torch

    from ctssl_core.evaluate.metrics import auroc
    from ctssl_core.ops import model_input, resize, slice_at
    from ctssl_core.probes import binary_oof

    hu = torch.from_numpy(np.ascontiguousarray(store.read(ids)))[:, None]  # (N, 1, H, W) int16, read once

    def probe(encoder: Any, step: int) -> dict[str, float]:
        encoder.eval()
        feats = []
        with torch.no_grad():
            for i in range(0, len(hu), 64):
                x = slice_at(model_input(hu[i:i + 64].to(device), encoder.windows), 0)  # (b, C, H, W)
                if image_size:
                    x = resize(x, image_size)  # as the loader resizes training inputs (ops.resize)
                feats.append(encoder.embed(x).float().cpu())
        z = torch.cat(feats).numpy()  # (N, D)
        if not np.all(np.isfinite(z)):
            return {}                 # a diverged encoder: its loss says so; no probe value to draw
        return {"probe/pe_auroc": auroc(y, binary_oof(z, y, patient_idx)), "probe/n": float(len(y))}

    return probe


def run_pretrain(task: str | None, store_root: str | Path | None = None, profile: str | None = None,
                 config_path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
                 resume_run_id: str | None = None, progress: bool = True,
                 echo: Callable[[str], None] = print, labels: dict | None = None,
                 config: PretrainConfig | None = None) -> PretrainResult:
    """Pretrain one strategy on a store and record it in its run folder (``results/runfolder.py``; the CLI,
    the benchmark or the job runner merges the folder into the store; called from Python,
    ``results.write.merge_pending(store_root, result.run_id)`` does). Raises ConfigError/StoreError with advice.

    ``config``: an already resolved config (a benchmark's unit), used as it is; else it is resolved from
    ``profile``/``config_path``/``overrides``. Either way the run stores its identity
    (``plan.pretrain_hash``), by which a benchmark finds and reuses it.
    ``labels``: the run's name/tags/notes (``results.write.check_labels``), stored with its row."""
    import torch

    from ctssl_core import distributed
    from ctssl_core.data.catalog import store_dataset
    from ctssl_core.data.loader import SliceBatcher
    from ctssl_core.data.store import SliceStore
    from ctssl_core.models import build_encoder
    from ctssl_core.pretext import make_pretext
    from ctssl_core.results.runfolder import RunLogger
    from ctssl_core.results.runfolder import new_run_id, record_end, record_end_after, record_start
    from ctssl_core.train import fit, resolve_device

    root = store_paths(store_root).root
    base = None
    if config is not None:
        if resume_run_id or profile or config_path or overrides:
            raise ConfigError("run_pretrain takes a resolved config or the profile/config/overrides to resolve it "
                              "from, not both")
    elif resume_run_id:
        saved = store_paths(root).run_dir(resume_run_id) / "config.json"
        if not saved.is_file():
            raise ConfigError(f"cannot resume {resume_run_id!r}: no {saved}. List runs in the dashboard or "
                              f"start a new run without --resume")
        saved_cfg = json.loads(saved.read_text())
        base = saved_cfg.get("pretrain")
        if task and base and task != base.get("task"):
            raise ConfigError(f"run {resume_run_id} pretrained {base.get('task')!r}, not {task!r}; drop --task or start a new run")
        task, profile, config_path = None, saved_cfg.get("profile"), None
    elif profile is None and config_path is None:
        profile = default_profile()
    cfg = config if config is not None else resolve_config(task, None if resume_run_id else profile, config_path,
                                                           overrides, base=base)
    if task and cfg.task != task:
        raise ConfigError(f"the config pretrains {cfg.task!r}, not {task!r}")
    pretext = make_pretext(cfg.task, **dict(cfg.tasks.get(cfg.task, {}) or {}))

    info = distributed.init_from_env(cfg.train.device)
    store = SliceStore.open(root)  # StoreMissing with the ingest command if there is none
    if info.enabled and not info.is_main:
        distributed.barrier(info)  # rank 0 writes the splits table first (one writer)
        ids = train_positions(store, root, cfg)
    else:
        try:
            ids = train_positions(store, root, cfg)
        finally:  # release the other ranks even on error (they then hit the same error themselves)
            if info.enabled:
                distributed.barrier(info)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)

    torch.manual_seed(cfg.train.seed)  # encoder init is part of the run's determinism
    encoder = build_encoder(cfg.encoder, windows=cfg.windows, **dict(cfg.encoder_params))
    image_size, crop = input_geometry(pretext, cfg.train.image_size, cfg.train.crop)
    batches = SliceBatcher(
        store, ids, cfg.train.batch_size, context=pretext.context, gap=pretext.gap or 1,
        label_keys=tuple(pretext.label_keys), device=device, seed=cfg.train.seed,
        image_size=image_size, crop=crop, rank=info.rank, world_size=info.world_size,
        wants_hu=pretext.wants_hu, windows=encoder.windows,
    )
    run_id = distributed.broadcast_object(resume_run_id or new_run_id("pretrain", cfg.task, "random"), info)
    run_cfg = {"kind": "pretrain", "task": cfg.task, "encoder": cfg.encoder, "encoder_params": dict(cfg.encoder_params),
               "task_params": dataclasses.asdict(pretext) if dataclasses.is_dataclass(pretext) else {},
               "pretrain": to_dict(cfg), "profile": profile, "store": Path(root).name,
               "data": {"n_slices": int(len(ids)), "image_size": image_size or int(store.height), "crop": crop or 0,
                        "windows": [list(w) for w in encoder.windows],
                        "split": cfg.split, "split_seed": cfg.split_seed, "world_size": info.world_size}}
    run_dir = store_paths(root).run_dir(run_id)
    logger = None
    if info.is_main:
        record_start(root, run_id, kind="pretrain", task=cfg.task, init="random", encoder=cfg.encoder,
                  config=run_cfg, seed=cfg.train.seed, profile=profile, dataset=store_dataset(root), labels=labels,
                  unit_hash=pretrain_hash(cfg))
        logger = RunLogger(root, run_id)
        echo(f"run {run_id}: {cfg.task} on {cfg.encoder}, {len(ids)} slices, {cfg.train.steps} steps, device {device}")

    eval_fn = None
    if cfg.probe_every and info.is_main:
        p_ids, p_y = heldout_pe_ids(store, root, cfg)
        if len(p_ids) >= 16 and 2 <= p_y.sum() <= len(p_y) - 2:
            from ctssl_core.data.loader import _positions_of

            p_pat = np.asarray(store.patient_idx)[_positions_of(store, p_ids)]
            eval_fn = make_online_probe(store, p_ids, p_y, p_pat, cfg.train.image_size or None, device)
        else:
            echo(f"online probe off: {len(p_ids)} labelled held-out slices (need >= 16 with >= 2 of each PE class)")

    bar = None
    if progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, desc=f"pretrain {cfg.task}", unit="step", dynamic_ncols=True)

    def log(rec: dict[str, Any]) -> None:
        if logger is not None:
            logger(rec)
        if bar is not None and "train/loss" in rec:
            bar.set_postfix(loss=f"{rec['train/loss']:.4f}", img_s=f"{rec.get('throughput', 0):.0f}")

    def tick(step: int) -> None:
        if bar is not None:
            bar.update(step - bar.n)

    status, error = "failed", None
    failing: BaseException | None = None     # what stopped training (the `finally` records the end around it)
    try:
        train_cfg = cfg.train
        if eval_fn is not None:
            train_cfg = dataclasses.replace(cfg.train, eval_every=cfg.probe_every)
        res = fit(pretext, encoder, batches, train_cfg, log=log, run_dir=run_dir, resume=bool(resume_run_id),
                  run_config=run_cfg, progress=tick, eval_fn=eval_fn)
        status = "cancelled" if res.stopped == "signal" else "succeeded"
        if status == "cancelled":
            error = f"stopped by SIGTERM at step {res.step}; resume with `ctssl pretrain --resume {run_id}`"
    except KeyboardInterrupt as e:
        status, error = "cancelled", "interrupted; resume with `ctssl pretrain --resume " + run_id + "`"
        e.run_id = run_id                          # the CLI's resume hint names the run
        failing = e
        raise
    except Exception as e:  # noqa: BLE001 - recorded, then re-raised for the CLI to print
        error = f"{type(e).__name__}: {e}"
        failing = e
        raise
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            last = run_dir / "checkpoints" / "last.pt"
            ckpt = last if last.is_file() else None
            if failing is not None:      # a second failure (a full disk under the store) must not hide this one
                record_end_after(failing, root, run_id, status, checkpoint=ckpt, error=error, close=logger.close)
            else:
                logger.close()
                record_end(root, run_id, status, checkpoint=ckpt, error=error)
        distributed.cleanup()
    if info.is_main:
        losses = (f"loss {res.first_loss:.4f} -> {res.final_loss:.4f}" if res.first_loss is not None
                  else f"already at step {res.step}")
        echo(f"run {run_id} {status}: {losses} in {res.wall_s:.1f}s ({res.throughput:.0f} img/s); "
             f"checkpoint {res.checkpoint}")
    return PretrainResult(run_id, run_dir, res.checkpoint, res.step, res.first_loss, res.final_loss, status, int(len(ids)))
