"""Fine-tune one downstream task from one init at one label fraction and seed, then score it.

One *unit* of the benchmark: ``finetune(cfg, store_root, ...)`` picks the
training patients (a nested, seeded subset of the train split), trains with
``train.fit`` (the same loop as pretraining), logs validation metrics during
training (the learning curves behind the speed ratio), scores the test split
with patient-bootstrap CIs, and writes everything through ``results/write.py``:
the ``runs`` row, metrics (JSONL -> ``metrics``), one ``results`` row per metric.

Two files in the run folder let the benchmark summarise without re-running a
model: ``boot.npz`` (bootstrap replicates per metric; every run of a benchmark
draws the same test patients with the same seed, so replicates subtract for
paired differences and feed ``labels_needed`` per draw) and ``curve.jsonl``
(validation metric per evaluation step).

Label fractions are nested: for a seed, the patients of the 5% subset are the
first 5% of one seeded permutation of the train patients, so they are also in
the 25% subset. Different seeds draw different subsets (the spread we report).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctssl_core.config import ConfigError, to_dict
from ctssl_core.paths import in_store
from ctssl_core.scoring import collect_outputs, point_metrics, row_keys, score_outputs

BOOT_FILE = "boot.npz"
CURVE_FILE = "curve.jsonl"
EXAM_SCORES = "exam_scores.parquet"            # PE exam scores of the test split (subgroup performance)
VAL_EXAM_SCORES = "exam_scores_val.parquet"    # ... of the validation split (the subgroup TPR/FPR threshold)


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "pe"
    init: str = "random"              # 'random' | pretext key (latest pretrain of it) | run id | checkpoint path
    fraction: float = 1.0             # of training patients
    seed: int = 0                     # training seed and patient-subset seed
    split_seed: int = 0               # patient-level train/val/test split (identical for every init)
    pool: float = 0.0                 # fraction of patients set apart as the unlabelled pretraining pool
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train/val/test shares of the labelled cohort
    train_split: str = "train"        # 'train' (the labelled cohort) | 'pool' (supervised pretraining on
                                      # the pool's labels: the positive control of the benchmark)
    encoder: str = "tiny"             # for random init; pretrained inits use the checkpoint's
    encoder_kwargs: dict = field(default_factory=dict)
    windows: Any = None               # HU windows of the model input (ops.WINDOWS preset or pairs); None: the
                                      # checkpoint's (paper's single window for random init). A pretrained
                                      # init with other windows than asked is an error, not a silent re-view
    task_params: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)       # TrainConfig fields
    freeze_encoder: bool = False
    nodule_neg_ratio: float = 1.0     # nodule: empty slices per nodule slice in training
    val_max_slices: int = 512
    test_max_slices: int = 0          # 0 = the whole test split
    eval_batch_size: int = 64
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction} (e.g. --fraction 0.25)")
        from ctssl_core.downstream import DOWNSTREAM

        if self.task not in DOWNSTREAM:
            raise ConfigError(f"unknown downstream task {self.task!r}; choose one of {sorted(DOWNSTREAM)}")
        if self.n_boot < 10:
            raise ConfigError(f"n_boot must be >= 10, got {self.n_boot}")
        if self.train_split not in ("train", "pool"):
            raise ConfigError(f"train_split must be 'train' or 'pool', got {self.train_split!r}")
        if self.train_split == "pool" and not self.pool:
            raise ConfigError("train_split='pool' needs a pool: set pool to the fraction of patients set apart")
        if (self.train or {}).get("crop"):
            raise ConfigError("train.crop is for pretraining: slice labels (pe, demographics) do not survive a "
                              "random crop. Downstream tasks crop in the task: nodule crop/focus, pe roi "
                              "(task_params)")


@dataclass
class FinetuneResult:
    run_id: str
    init: str
    metrics: dict[str, Any]           # metric -> evaluate.CI
    curve: list[dict[str, float]]
    n_train_patients: int
    n_train_slices: int
    wall_s: float


# ------------------------------------------------------------------ data selection


def patient_keys(store) -> np.ndarray:
    return store.patients["patient_key"].to_numpy().astype(str)


def split_patient_idx(store, store_root: Path, split_seed: int, pool: float = 0.0,
                      fractions=(0.7, 0.15, 0.15)) -> dict[str, np.ndarray]:
    """Patient indices (rows of ``store.patients``) per split (and the unlabelled pool when ``pool``)
    of scheme (``split_seed``, ``pool``, ``fractions``)."""
    from ctssl_core.data.splits import get_or_create_splits

    splits = get_or_create_splits(store_root, split_seed, fractions, pool=pool)
    keys = patient_keys(store)
    lab = np.array([splits.get(k, "") for k in keys])
    return {s: np.flatnonzero(lab == s) for s in ("pool", "train", "val", "test")}


def fraction_subset(train_patients: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The first ceil(fraction * n) of one seeded permutation: nested across fractions for a seed."""
    pats = np.sort(np.asarray(train_patients))
    if pats.size == 0:
        raise ConfigError("the train split has no patients; ingest more data or check the split seed")
    perm = np.random.default_rng([int(seed), 2024]).permutation(pats)
    n = max(1, int(math.ceil(round(fraction * pats.size, 9))))
    return np.sort(perm[:n])


def task_slices(store, task_name: str, patients: np.ndarray, *, role: str, seed: int = 0,
                neg_ratio: float = 1.0, max_slices: int = 0) -> np.ndarray:
    """Slice ids of ``patients`` usable for ``task_name`` (labels known).

    Nodule training keeps every nodule slice plus ``neg_ratio`` x as many empty
    slices (seeded): with <1% nodule slices, uniform sampling would show the
    decoder almost nothing to segment. Evaluation keeps all slices of
    series with a mask. ``max_slices`` caps evaluation sets by whole patients
    (seeded) so per-patient statistics stay intact.
    """
    pidx = np.asarray(store.patient_idx)
    in_pat = np.isin(pidx, patients)
    if task_name == "pe":
        ok = in_pat & ~np.isnan(np.asarray(store.labels("pe"), dtype=np.float64))
    elif task_name == "nodule":
        npx = np.asarray(store.labels("nodule_px"), dtype=np.float64)
        ok = in_pat & ~np.isnan(npx)
        if role == "train":
            pos = np.flatnonzero(ok & (npx > 0))
            neg = np.flatnonzero(ok & (npx == 0))
            k = min(neg.size, int(round(neg_ratio * max(pos.size, 1))))
            neg = np.random.default_rng([seed, 99]).choice(neg, size=k, replace=False) if k else neg[:0]
            return np.sort(np.concatenate([pos, neg])).astype(np.int64)
    else:
        ok = in_pat
    ids = np.flatnonzero(ok).astype(np.int64)
    if max_slices and ids.size > max_slices:
        rng = np.random.default_rng([seed, 7])
        order = rng.permutation(np.unique(pidx[ids]))
        keep, total = [], 0
        for p in order:
            n = int(np.sum(pidx[ids] == p))
            if keep and total + n > max_slices:
                break
            keep.append(p)
            total += n
        ids = ids[np.isin(pidx[ids], keep)]
    return ids


def task_with_data_params(task_name: str, params: dict, store, train_ids: np.ndarray):
    """Build the task; fill data-dependent hyperparameters the user left unset."""
    from ctssl_core.downstream import make_downstream

    params = dict(params)
    if task_name == "pe" and not params.get("pos_weight"):
        y = np.asarray(store.labels("pe"), dtype=np.float64)[train_ids]
        n_pos = float(np.nansum(y))
        params["pos_weight"] = float(min((y.size - n_pos) / n_pos, 50.0)) if n_pos > 0 else 1.0
    if task_name == "demographics":
        pat = store.patients
        pidx = np.asarray(store.patient_idx)[train_ids]
        ages = pat["age"].astype("float64").to_numpy()[np.unique(pidx)]
        ages = ages[~np.isnan(ages)]
        if ages.size >= 2 and "age_mean" not in params:
            params["age_mean"] = float(ages.mean())
            params["age_std"] = float(max(ages.std(), 1.0))
        races = {str(v) for v in pat["race"].astype("object").to_numpy() if v is not None and v == v}
        params.setdefault("n_race", max(2, len(races)))
    return make_downstream(task_name, **params)


# ------------------------------------------------------------------ evaluation


def position_scores(store, train_ids: np.ndarray, ids: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """PE probability of each of ``ids`` from its relative z-position alone.

    The training slices' PE rate per decile of relative position in the series
    (0 = first slice, 1 = last). Why: emboli sit in the pulmonary arteries, so a
    slice's level predicts PE on its own; a classifier whose slice AUROC does not
    beat this has learned anatomy level, not emboli. Exams all get the same
    scores, so its exam AUROC is chance by construction.
    """
    y = np.asarray(store.labels("pe"), dtype=np.float64)
    idx = np.asarray(store.idx_in_series, dtype=np.float64)
    ser = np.asarray(store.series_of)
    n = np.bincount(ser)[ser].astype(np.float64)
    rel = idx / np.maximum(n - 1, 1)
    bins = np.minimum((rel * n_bins).astype(np.int64), n_bins - 1)
    tr = np.asarray(train_ids, dtype=np.int64)
    ok = ~np.isnan(y[tr])
    pos = np.bincount(bins[tr][ok], weights=y[tr][ok], minlength=n_bins)
    cnt = np.bincount(bins[tr][ok], minlength=n_bins)
    rate = (pos + 0.5) / (cnt + 1.0)                                   # smoothed: an empty bin is not 0
    return rate[bins[np.asarray(ids, dtype=np.int64)]]


def position_baseline(store, store_root: Path, split_seed: int = 0, n_boot: int = 1000, task_params=None,
                      pool: float = 0.0, fractions=(0.7, 0.15, 0.15)):
    """Every PE metric (with CIs) of ``position_scores`` on the test split of scheme (``split_seed``,
    ``pool``), the same test patients the fine-tunes are scored on: metric -> CI."""
    from ctssl_core.downstream import make_downstream

    splits = split_patient_idx(store, Path(store_root), split_seed, pool, fractions)
    train_ids = task_slices(store, "pe", splits["train"], role="train")
    test_ids = np.sort(task_slices(store, "pe", splits["test"], role="test"))
    if train_ids.size == 0 or test_ids.size == 0:
        raise ConfigError("the position baseline needs PE labels in the train and test splits")
    task = make_downstream("pe", **dict(task_params or {}))
    out = {"slice_id": test_ids, "prob": position_scores(store, train_ids, test_ids),
           "target": np.asarray(store.labels("pe"), dtype=np.float64)[test_ids],
           **row_keys(store, test_ids)}
    return score_outputs(task, out, n_boot)[0]


# ------------------------------------------------------------------ init


def resolve_init(init: str, store_root: Path, encoder: str, encoder_kwargs: dict, windows: Any = None):
    """-> (encoder module, init label, checkpoint path or None, encoder name). ``windows``: the input
    windows for random init; for a checkpoint, None or equal to the checkpoint's (ConfigError otherwise)."""
    from ctssl_core import checkpoint as ck
    from ctssl_core.models import build_encoder, windows_mismatch
    from ctssl_core.pretext import PRETEXT
    from ctssl_core.results.store_api import run_task

    if init == "random":
        return build_encoder(encoder, windows=windows, **encoder_kwargs), "random", None, encoder
    label = init
    ref: str | Path = init
    if init in PRETEXT:
        ref = latest_pretrain_checkpoint(store_root, init)
    enc, cfg = ck.load_encoder(ref, store_root)
    path = ck.resolve_checkpoint(ref, store_root)
    differs = windows_mismatch(enc, windows)
    if differs:
        raise ConfigError(f"init {init!r} was pretrained {differs}; fine-tune with its windows "
                          f"(drop downstream.windows) or pretrain with the ones you want")
    if init not in PRETEXT:  # a run id or path: label it with the pretext it was trained on
        label = str(cfg.get("task") or cfg.get("pretext") or run_task(store_root, str(init)) or init)
    return enc, label, path, getattr(enc, "name", encoder)


def latest_pretrain_checkpoint(store_root: Path, pretext: str) -> Path:
    from ctssl_core.db import StoreError
    from ctssl_core.paths import store_paths
    from ctssl_core.results.store_api import pretrain_checkpoints

    sp = store_paths(store_root)
    for c in pretrain_checkpoints(store_root, pretext):
        p = Path(c) if Path(c).is_absolute() else sp.root / c
        if p.is_file():
            return p
    raise StoreError(f"no finished pretraining of {pretext!r} in {sp.root}; run `ctssl pretrain --task {pretext}` "
                     f"first, or pass --init random / a run id / a checkpoint path")


# ------------------------------------------------------------------ the unit


def finetune(cfg: FinetuneConfig, store_root: str | Path, run_id: str | None = None,
             benchmark_id: str | None = None, profile: str | None = None,
             progress: Callable[[int], None] | None = None, store=None,
             init_label: str | None = None, twin_cohort: str | Path | None = None,
             labels: dict | None = None, unit_hash: str | None = None) -> FinetuneResult:
    """Train and score one (task, init, fraction, seed). Resumes a run folder that has a checkpoint.

    It writes its run folder only (``results/runfolder.py``: record, metric lines, results rows) and reads
    the store; its driver merges the folder into the store (the CLI when the command returns, the
    benchmark after each unit, the job runner). Called from Python, merge it yourself:
    ``results.write.merge_pending(store_root, result.run_id)`` (the dashboard shows it meanwhile).

    ``init_label`` names the init in the results (the pretext key) when
    ``cfg.init`` is a run id or path; by default it is read from the run.
    ``twin_cohort``: the synthetic cohort the store was built from; a PE model is then also
    scored on counterfactual twins of its test patients (``twins.py``).
    ``labels``: the run's name/tags/notes (``results.write.check_labels``), stored with its row.
    ``unit_hash``: the benchmark unit's identity (``plan.Unit.unit_hash``), stored with the run so that a
    resumed benchmark reruns the unit when its resolved config changed.
    """
    import time

    import torch

    from ctssl_core import train as train_mod
    from ctssl_core.config import build
    from ctssl_core.data.catalog import store_dataset
    from ctssl_core.data.loader import SliceBatcher
    from ctssl_core.data.store import SliceStore
    from ctssl_core.results import runfolder as rf

    root = Path(store_root)
    t0 = time.perf_counter()
    store = store or SliceStore.open(root)
    tcfg = build(train_mod.TrainConfig, cfg.train, where="train.")
    splits = split_patient_idx(store, root, cfg.split_seed, cfg.pool, cfg.split_fractions)
    train_pat = fraction_subset(splits[cfg.train_split], cfg.fraction, cfg.seed)
    train_ids = task_slices(store, cfg.task, train_pat, role="train", seed=cfg.seed, neg_ratio=cfg.nodule_neg_ratio)
    val_ids = task_slices(store, cfg.task, splits["val"], role="val", max_slices=cfg.val_max_slices)
    test_ids = task_slices(store, cfg.task, splits["test"], role="test", max_slices=cfg.test_max_slices)
    for name, ids in (("train", train_ids), ("test", test_ids)):
        if ids.size == 0:
            raise ConfigError(f"{cfg.task}: the {name} split has no labelled slices; ingest a cohort with "
                              f"{cfg.task} labels or raise the fraction")
    task = task_with_data_params(cfg.task, cfg.task_params, store, train_ids)
    # seed before anything random is built (encoder, head): a unit's weights must not depend on
    # what ran earlier in this process (benchmark workers run many units)
    train_mod.seed_everything(cfg.seed)
    encoder, label, ckpt, enc_name = resolve_init(cfg.init, root, cfg.encoder, cfg.encoder_kwargs, cfg.windows)
    init_label = init_label or label
    device = train_mod.resolve_device(tcfg.device)
    batch_size = min(tcfg.batch_size, train_ids.size)
    if batch_size != tcfg.batch_size:
        tcfg = dataclasses.replace(tcfg, batch_size=batch_size)
    run_id = run_id or rf.new_run_id("finetune", cfg.task, init_label)
    run_config = {**to_dict(cfg), "windows": [list(w) for w in encoder.windows],
                  "init_label": init_label, "init_checkpoint": in_store(ckpt, root) if ckpt else None,
                  "encoder": enc_name, "task_resolved": to_dict(task), "kind": "finetune"}
    run_dir = rf.record_start(root, run_id, "finetune", cfg.task, init_label, enc_name, run_config,
                           fraction=cfg.fraction, seed=cfg.seed, profile=profile, benchmark_id=benchmark_id,
                           dataset=store_dataset(root), labels=labels, unit_hash=unit_hash)
    logger = rf.RunLogger(root, run_id)
    curve_path = run_dir / CURVE_FILE
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    if not resume and curve_path.exists():
        curve_path.unlink()
    head = task.build_head(encoder)
    headline = task.headline

    def eval_fn(enc, step):
        if val_ids.size == 0:
            return {}
        out = collect_outputs(task, enc, head, store, val_ids, cfg.eval_batch_size, device, tcfg.image_size)
        m = point_metrics(task, out)
        rec = {"step": step, **{f"val/{k}": float(v) for k, v in m.items()}}
        with open(curve_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return {k: v for k, v in rec.items() if k != "step"}

    try:
        loader = SliceBatcher(store, train_ids, tcfg.batch_size, label_keys=task.label_keys, device=device,
                              seed=cfg.seed, image_size=tcfg.image_size or None, windows=encoder.windows)
        fres = train_mod.fit(task, encoder, loader, tcfg, log=logger, run_dir=run_dir, resume=resume,
                             freeze_encoder=cfg.freeze_encoder, eval_fn=eval_fn if tcfg.eval_every else None,
                             head=head, run_config=run_config, progress=progress)
        if fres.stopped != "completed":  # SIGTERM/cancel: no test scores, no results; the run stays resumable
            stop = KeyboardInterrupt(f"fine-tune stopped by {fres.stopped} at step {fres.step}; "
                                     f"re-run (or resume the job) to finish it")
            if fres.stopped == "signal":
                stop.signal = "SIGTERM"            # the CLI exits 143, as for any process ended by SIGTERM
            raise stop
        head = fres.head or head
        out = collect_outputs(task, encoder.to(device), head, store, test_ids, cfg.eval_batch_size, device,
                              tcfg.image_size)
        cis, samples = score_outputs(task, out, cfg.n_boot)
        if cfg.task == "pe":
            save_exam_scores(task, out, store, run_dir)
            # every slice of every validation exam (val_ids is capped by val_max_slices for speed during
            # training): an exam score over a subset of its slices would not be on the test scores' scale
            val_all = task_slices(store, cfg.task, splits["val"], role="test")
            if val_all.size:
                vout = collect_outputs(task, encoder, head, store, val_all, cfg.eval_batch_size, device,
                                       tcfg.image_size)
                save_exam_scores(task, vout, store, run_dir, VAL_EXAM_SCORES)
            if twin_cohort is not None:
                from ctssl_core import twins as tw

                ts = tw.build_twins(twin_cohort, root, patient_keys(store)[splits["test"]],
                                    int(store.read(store.slice_ids[:1]).shape[-1]))
                tcis, tsamples = tw.score_twins(task, encoder, head, ts, cfg.eval_batch_size, device,
                                                tcfg.image_size, n_boot=cfg.n_boot)
                cis, samples = {**cis, **tcis}, {**samples, **tsamples}
        np.savez(run_dir / BOOT_FILE, **{k: v for k, v in samples.items()},
                 **{f"point/{k}": np.float64(c.value) for k, c in cis.items()})
        n_pat = int(len(np.unique(out["patient"])))
        rf.record_results(root, run_id, [
            {"run_id": run_id, "benchmark_id": benchmark_id, "task": cfg.task, "init": init_label,
             "fraction": cfg.fraction, "seed": cfg.seed, "split": "test", "metric": m,
             "value": _num(c.value), "ci_low": _num(c.low), "ci_high": _num(c.high), "n": n_pat}
            for m, c in cis.items()])
        logger({"step": fres.step, **{f"test/{m}": c.value for m, c in cis.items()}})
        logger.close()
        rf.record_end(root, run_id, "succeeded", checkpoint=fres.checkpoint)
    except BaseException as e:
        rf.record_end_after(e, root, run_id, "cancelled" if isinstance(e, KeyboardInterrupt) else "failed",
                         error=f"{type(e).__name__}: {e}"[:2000], close=logger.close)
        raise
    return FinetuneResult(run_id, init_label, cis, read_curve(run_dir), int(train_pat.size), int(train_ids.size),
                          time.perf_counter() - t0)


def save_exam_scores(task, out: dict[str, np.ndarray], store, run_dir: Path, name: str = EXAM_SCORES) -> None:
    """Per-exam PE scores (patient_key, exam, score, label) of one split for the subgroup analysis of
    ``bias.analyse_encoder``: the test split's (``EXAM_SCORES``) are measured, the validation split's
    (``VAL_EXAM_SCORES``) choose the TPR/FPR threshold. Keys are the store's pseudonyms, never patient
    identifiers."""
    import pandas as pd

    from ctssl_core import evaluate as ev

    exams, score = ev.aggregate_exam(out["exam"], out["prob"], task.exam_agg, task.topk)
    _, label = ev.aggregate_exam(out["exam"], out["target"], "max")
    first = {e: p for e, p in zip(out["exam"][::-1], out["patient"][::-1])}
    keys = patient_keys(store)
    pd.DataFrame({"patient_key": [keys[first[e]] for e in exams], "exam": exams.astype(np.int64),
                  "score": score, "label": label.astype(np.int64)}).to_parquet(Path(run_dir) / name)


def read_exam_scores(run_dir: str | Path) -> tuple["pd.DataFrame | None", "pd.DataFrame | None"]:
    """(test, validation) PE exam scores (patient_key, score, label) a fine-tune saved; None where absent
    (not a PE run, or a run written before validation scores were saved)."""
    import pandas as pd

    got = [Path(run_dir) / n for n in (EXAM_SCORES, VAL_EXAM_SCORES)]
    return tuple(pd.read_parquet(p)[["patient_key", "score", "label"]] if p.is_file() else None for p in got)


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    p = Path(run_dir) / CURVE_FILE
    if not p.exists():
        return []
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows}             # a resumed run may repeat a step: keep the last
    return [by_step[s] for s in sorted(by_step)]


def read_boot(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(Path(run_dir) / BOOT_FILE) as z:
        return {k: z[k] for k in z.files}


def _num(v: float) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None
