"""Seed a store with realistic synthetic *results* for dashboard tests and benchmarks.

Why: the dashboard must be built and tested before (and independently of) the
training code that writes real results. ``seed_store`` fills every results
table the dashboard reads — runs, metrics, results, summaries, benchmarks,
embeddings + projections, bias_results — plus a small catalog (patients,
studies, series with real int16 slice arrays and nodule masks, slices,
ingest_errors), all following ``ctssl_core.schema`` exactly.

Planted, known effects (tests derive expectations from the stored rows, but
these make the pictures meaningful): masked_region pretraining is best on
every downstream task, random init worst; segmentation from pretraining
learns ~2x faster; the masked_region embedding separates race more than the
random-init one; run 0's ``train/loss`` has one spike (value 10) at step
``n_steps // 3`` so downsampling can be checked to keep it.

Everything is deterministic for a given ``seed``. Nothing here is imported by
pages at run time except through tests and the benchmark script.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

INITS = ["random", "masked_region", "next_slice", "rotation", "flip", "denoise"]
# planted gain over random init, in headline-metric units (higher is better)
INIT_GAIN = {"random": 0.0, "masked_region": 0.045, "next_slice": 0.03, "rotation": 0.012,
             "flip": 0.006, "denoise": 0.025}
TASKS = {"pe": ["slice_auroc", "exam_auroc"], "nodule": ["dice"]}
FRACTIONS = [0.01, 0.1, 0.25, 1.0]
METRIC_NAMES = ["train/loss", "val/loss", "lr", "val/auroc"]
BENCHMARK_ID = "bench-seed"
T0 = datetime(2026, 11, 20, 9, 0, 0)
SPIKE_VALUE = 10.0


@dataclass
class SeedConfig:
    """Sizes of the seeded store. Defaults are tiny (tests); the benchmark asks for 1,000 x 10,000 x 4."""

    n_runs: int = 12                 # runs with metric curves (downstream + pretrain runs)
    n_steps: int = 200               # metric rows per run and metric name
    metric_names: list[str] = field(default_factory=lambda: list(METRIC_NAMES))
    n_seeds: int = 2                 # seeds per (task, init, fraction) in `results`
    n_embed_points: int = 400        # rows per embedding (slice level)
    embed_dim: int = 16
    n_patients: int = 12
    slices_per_series: int = 6
    image_size: int = 64
    seed: int = 0
    running_run: bool = True         # one run with status 'running' and a partial curve
    deleted_checkpoint: bool = True  # one finished run whose checkpoint file is absent


@dataclass
class SeedSummary:
    root: Path
    run_ids: list[str]
    n_metric_rows: int
    emb_ids: list[str]
    spike_run: str
    spike_step: int


def _run_specs(cfg: SeedConfig) -> list[dict]:
    """Run rows: first the 5 pretrain runs, then downstream runs cycling task x init x fraction x seed."""
    specs = []
    for i, init in enumerate(i for i in INITS if i != "random"):
        specs.append(dict(kind="pretrain", task=init, init="random", fraction=None, seed=0))
    combos = [(t, i, f, s) for s in range(max(cfg.n_seeds, 1)) for t in TASKS for i in INITS for f in FRACTIONS]
    k = 0
    while len(specs) < cfg.n_runs:
        t, i, f, s = combos[k % len(combos)]
        specs.append(dict(kind="finetune", task=t, init=i, fraction=f, seed=s + 100 * (k // len(combos))))
        k += 1
    specs = specs[: cfg.n_runs]
    for n, s in enumerate(specs):
        s["run_id"] = f"run-{n:04d}-{s['kind']}-{s['task']}-{s['init']}"
    return specs


def _curve(rng: np.random.Generator, name: str, steps: np.ndarray, gain: float) -> np.ndarray:
    """A plausible training curve for metric ``name`` (float64, same length as ``steps``)."""
    n = max(len(steps), 1)
    t = steps / n
    noise = rng.standard_normal(len(steps))
    if name == "lr":
        return 1e-3 * 0.5 * (1 + np.cos(np.pi * t))
    if name.endswith("loss"):
        base = 0.3 - gain + 1.7 * np.exp(-5 * t)
        return np.maximum(base + 0.05 * noise, 1e-3)
    return np.clip(0.5 + (0.3 + gain) * (1 - np.exp(-4 * t)) + 0.01 * noise, 0, 1)


def _insert_df(con, table: str, df) -> None:
    con.register("_seed_df", df)
    cols = ", ".join(df.columns)
    con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _seed_df")
    con.unregister("_seed_df")


def _insert_metrics(con, cfg: SeedConfig, specs: list[dict], rng: np.random.Generator) -> tuple[int, str, int]:
    """Insert metric rows run by run (ordered run, name, step) so run filters skip row groups."""
    import pyarrow as pa

    total = 0
    spike_step = cfg.n_steps // 3
    names = cfg.metric_names
    batch: list = []
    rows_in_batch = 0
    for n, spec in enumerate(specs):
        steps_n = cfg.n_steps // 2 if (cfg.running_run and n == len(specs) - 1) else cfg.n_steps
        steps = np.arange(steps_n, dtype=np.int64)
        gain = INIT_GAIN.get(spec["init"], 0.0)
        epoch = steps / max(cfg.n_steps / 10, 1)
        wall = steps * 0.05 + 0.001 * np.cumsum(rng.random(steps_n))
        for name in names:
            values = _curve(rng, name, steps, gain)
            if n == 0 and name == names[0] and spike_step < steps_n:
                values[spike_step] = SPIKE_VALUE
            batch.append(pa.table({
                "run_id": pa.DictionaryArray.from_arrays(np.zeros(steps_n, np.int32), [spec["run_id"]]),
                "step": steps, "epoch": epoch, "wall_s": wall,
                "name": pa.DictionaryArray.from_arrays(np.zeros(steps_n, np.int32), [name]),
                "value": values,
            }))
            rows_in_batch += steps_n
        if rows_in_batch >= 2_000_000 or n == len(specs) - 1:
            tbl = pa.concat_tables(batch)
            con.register("_seed_metrics", tbl)
            con.execute("INSERT INTO metrics (run_id, step, epoch, wall_s, name, value) "
                        "SELECT run_id::TEXT, step, epoch, wall_s, name::TEXT, value FROM _seed_metrics")
            con.unregister("_seed_metrics")
            total += rows_in_batch
            batch, rows_in_batch = [], 0
    return total, specs[0]["run_id"], spike_step


def _headline_value(task: str, metric: str, init: str, fraction: float) -> float:
    """Planted truth: value grows with label fraction; pretraining adds INIT_GAIN (more at low fractions)."""
    base = {"slice_auroc": 0.72, "exam_auroc": 0.75, "dice": 0.55}[metric]
    return base + 0.15 * fraction ** 0.3 + INIT_GAIN[init] * (1.5 - 0.5 * fraction)


def _results_rows(cfg: SeedConfig, rng: np.random.Generator, run_by_key: dict) -> "pd.DataFrame":  # noqa: F821
    import pandas as pd

    rows = []
    for task, metrics in TASKS.items():
        for init in INITS:
            for fraction in FRACTIONS:
                for s in range(cfg.n_seeds):
                    for metric in metrics:
                        v = _headline_value(task, metric, init, fraction) + 0.004 * rng.standard_normal()
                        half = 0.05 / np.sqrt(fraction * 20 + 1)
                        rows.append(dict(run_id=run_by_key.get((task, init, fraction, s)), benchmark_id=BENCHMARK_ID,
                                         task=task, init=init, fraction=fraction, seed=s, split="test",
                                         metric=metric, value=v, ci_low=v - half, ci_high=v + half,
                                         n=int(2000 * fraction) + 50))
    return pd.DataFrame(rows)


def _summary_rows(results) -> "pd.DataFrame":  # noqa: F821
    import pandas as pd

    full = results[results.fraction == 1.0].groupby(["task", "init", "metric"], as_index=False).agg(
        value=("value", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"))
    full["benchmark_id"] = BENCHMARK_ID
    full["note"] = "test split, full labels, mean over seeds"
    extra = []
    for init in INITS:
        if init == "random":
            continue
        g = INIT_GAIN[init] / INIT_GAIN["masked_region"]
        extra.append(dict(benchmark_id=BENCHMARK_ID, task="nodule", init=init, metric="speed_ratio",
                          value=1 + g, ci_low=1 + 0.8 * g, ci_high=1 + 1.2 * g,
                          note="steps for random init to reach 90% of its final Dice / steps for this init"))
        extra.append(dict(benchmark_id=BENCHMARK_ID, task="pe", init=init, metric="labels_saved",
                          value=0.6 * g, ci_low=0.4 * g, ci_high=0.8 * g,
                          note="fraction of labels saved at equal slice AUROC"))
    return pd.concat([full, pd.DataFrame(extra)], ignore_index=True)


def _phantom(rng: np.random.Generator, s: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A small chest-like int16 HU volume (S, H, W) and a uint8 nodule mask (S, H, W)."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    body = (xx / 0.45) ** 2 + (yy / 0.35) ** 2 < 1
    lungs = ((np.abs(xx) - 0.2) / 0.15) ** 2 + (yy / 0.25) ** 2 < 1
    spine = (xx / 0.05) ** 2 + ((yy - 0.25) / 0.05) ** 2 < 1
    img = np.full((size, size), -1000.0)
    img[body] = 40
    img[lungs] = -850
    img[spine] = 700
    vol = np.repeat(img[None], s, 0) + rng.normal(0, 15, (s, size, size))  # (S, H, W)
    mask = np.zeros((s, size, size), np.uint8)
    cx, cy, r = 0.2, -0.05, 0.05
    nod = ((xx - cx) ** 2 + (yy - cy) ** 2) < r ** 2
    for k in range(s // 3, s // 3 + 2):
        vol[k][nod] = 30
        mask[k][nod] = 1
    return vol.astype(np.int16), mask


def _seed_catalog(con, root: Path, cfg: SeedConfig, rng: np.random.Generator) -> "pd.DataFrame":  # noqa: F821
    import pandas as pd

    (root / "slices").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    races = ["White", "Black", "Asian", "Other"]
    patients, studies, series, slices = [], [], [], []
    sid = 0
    for p in range(cfg.n_patients):
        pk = f"{rng.integers(0, 2**63):016x}"[:16]
        site = f"site-{p % 3}"
        patients.append(dict(patient_key=pk, age=float(30 + (p * 7) % 50), sex="F" if p % 2 else "M",
                             race=races[p % len(races)],
                             attributes=json.dumps({"control_group": "A" if p % 3 else "B", "site": site})))
        stk, sek = f"st{pk[:14]}", f"se{pk[:14]}"
        pe_exam = p % 3 == 0
        studies.append(dict(study_key=stk, patient_key=pk, dataset="synthetic", pe_exam=pe_exam,
                            exam_labels=json.dumps({"negative_exam_for_pe": int(not pe_exam)})))
        vol, mask = _phantom(rng, cfg.slices_per_series, cfg.image_size)
        np.save(root / "slices" / f"{sek}.npy", vol)
        has_mask = p % 2 == 0
        if has_mask:
            np.save(root / "masks" / f"{sek}.npy", mask)
        series.append(dict(series_key=sek, study_key=stk, patient_key=pk, array_path=f"slices/{sek}.npy",
                           mask_path=f"masks/{sek}.npy" if has_mask else None, n_slices=cfg.slices_per_series,
                           height=cfg.image_size, width=cfg.image_size, orig_rows=512, orig_cols=512,
                           pixel_spacing_mm=0.7 * 512 / cfg.image_size, slice_spacing_mm=2.5,
                           slice_thickness_mm=2.5, site=site, manufacturer="SYNTH", model="Phantom-1",
                           kernel="STANDARD", selection_rule="thinnest axial", ingested_at=T0))
        for k in range(cfg.slices_per_series):
            slices.append(dict(slice_id=sid, series_key=sek, idx=k, sop_key=f"sop{sid:013d}", z_mm=2.5 * k,
                               pe=bool(pe_exam and cfg.slices_per_series // 2 <= k),
                               nodule_px=int(mask[k].sum()) if has_mask else None))
            sid += 1
    errors = pd.DataFrame([
        dict(path="incoming/readme.txt", reason="not_dicom", detail="not a DICOM file; it was skipped",
             logged_at=T0),
        dict(path="incoming/p9/broken.dcm", reason="truncated",
             detail="file ends early (truncated copy?); copy it again and re-run `ctssl ingest`", logged_at=T0),
    ])
    for table, rows in [("patients", patients), ("studies", studies), ("series", series), ("slices", slices)]:
        _insert_df(con, table, pd.DataFrame(rows))
    _insert_df(con, "ingest_errors", errors)
    return pd.DataFrame(patients)


def _seed_embeddings(root: Path, cfg: SeedConfig, rng: np.random.Generator) -> tuple[list[str], "pd.DataFrame"]:  # noqa: F821
    """Two slice-level embeddings (random init, masked_region) with PCA and UMAP-like 2D points.

    Keys and vectors go through the production code (``embed.catalog_keys`` on
    the seeded catalog, ``embed.save_embeddings``), so the files the dashboard
    reads here are the files ``ctssl embed`` writes (issue 14: a hand-made keys
    parquet with an extra ``row`` column hid a page that failed on every real
    store). Points are drawn with replacement from the small seeded catalog;
    projections are stored as ``compute_projections`` stores them (``row, x, y``).
    Returns (emb ids, ``projections`` rows to insert).
    """
    import pandas as pd

    from ctssl_core.embed import catalog_keys, save_embeddings

    catalog = catalog_keys(root, split="all")                  # one row per seeded slice, production columns
    n = cfg.n_embed_points
    keys = catalog.iloc[np.sort(rng.integers(0, len(catalog), n))].reset_index(drop=True).assign(split="test")
    race_code = pd.Categorical(keys.race).codes.astype(float)
    proj_rows, ids = [], []
    for init, sep in [("random", 0.2), ("masked_region", 2.0)]:
        emb_id = f"emb-{init}-test"
        x = rng.standard_normal((n, cfg.embed_dim)).astype(np.float32)  # (N, D)
        x[:, 0] += sep * race_code
        save_embeddings(root, emb_id, x, keys, init=init, encoder="resnet18", split="test", level="slice",
                        run_id=None if init == "random" else "run-0000-pretrain-masked_region-random")
        for method in ["pca", "umap"]:
            xy = x[:, :2] if method == "pca" else np.tanh(x[:, :2] * 0.7) * 5
            path = f"embeddings/{emb_id}.{method}.parquet"
            pd.DataFrame({"row": np.arange(n, dtype=np.int64), "x": xy[:, 0], "y": xy[:, 1]}).to_parquet(
                root / path, index=False)
            proj_rows.append(dict(emb_id=emb_id, method=method, params=json.dumps({"seed": 0}), seconds=0.5,
                                  n_points=n, sampled=False, path=path))
        ids.append(emb_id)
    return ids, pd.DataFrame(proj_rows)


def _bias_rows(emb_ids: list[str]) -> "pd.DataFrame":  # noqa: F821
    import pandas as pd

    ref, enc = emb_ids[0], emb_ids[1]
    rows = []
    probes = [("age", "mae", 9.8, 9.9), ("sex", "auroc", 0.71, 0.70), ("race", "auroc", 0.83, 0.73),
              ("control_group", "auroc", 0.52, 0.51)]
    for attr, metric, v, rv in probes:
        d = v - rv
        flagged = attr == "race"
        sentence = (f"A linear probe predicts {attr} from the embedding with {metric.upper()} {v:.2f} "
                    f"(random init {rv:.2f}); "
                    + ("this encoder carries clearly more information about it than random init."
                       if flagged else "no clear difference from random init."))
        rows.append(dict(emb_id=enc, reference_emb_id=ref, analysis="probe", attribute=attr, group_a=None,
                         group_b=None, metric=metric, value=v, ci_low=v - 0.02, ci_high=v + 0.02, delta=d,
                         delta_ci_low=d - 0.03, delta_ci_high=d + 0.03, p_value=0.001 if flagged else 0.4,
                         p_adjusted=0.004 if flagged else 0.8, flagged=flagged, sentence=sentence))
    for mode in range(1, 4):
        for attr, a, b, stat in [("race", "White", "Black", 0.31 / mode), ("sex", "F", "M", 0.04)]:
            p = 1e-6 if stat > 0.1 else 0.5
            rows.append(dict(emb_id=enc, reference_emb_id=ref, analysis="ks", attribute=attr, group_a=a, group_b=b,
                             metric=f"ks_pc{mode}", value=stat, ci_low=None, ci_high=None, delta=None,
                             delta_ci_low=None, delta_ci_high=None, p_value=p, p_adjusted=min(p * 6, 1),
                             flagged=p < 0.05,
                             sentence=f"PC{mode} is distributed {'differently' if p < 0.05 else 'alike'} "
                                      f"for {a} and {b} patients (KS {stat:.2f})."))
    for attr, groups in [("sex", ["F", "M"]), ("race", ["White", "Black", "Asian", "Other"])]:
        for k, g in enumerate(groups):
            for metric, v in [("auroc", 0.84 - 0.02 * k), ("tpr", 0.78 - 0.03 * k), ("fpr", 0.12 + 0.01 * k)]:
                rows.append(dict(emb_id=enc, reference_emb_id=ref, analysis="subgroup", attribute=attr, group_a=g,
                                 group_b=None, metric=metric, value=v, ci_low=v - 0.04, ci_high=v + 0.04,
                                 delta=None, delta_ci_low=None, delta_ci_high=None, p_value=None, p_adjusted=None,
                                 flagged=False, sentence=f"PE {metric.upper()} for {attr}={g}: {v:.2f}."))
    return pd.DataFrame(rows)


def seed_store(root: str | Path, cfg: SeedConfig | None = None) -> SeedSummary:
    """Create (or add to) the store at ``root`` with synthetic results; see the module docstring."""
    import pandas as pd

    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths
    from ctssl_core.schema import ensure_schema

    cfg = cfg or SeedConfig()
    root = Path(root)
    sp = store_paths(root)
    rng = np.random.default_rng(cfg.seed)
    specs = _run_specs(cfg)
    run_rows = []
    for n, s in enumerate(specs):
        running = cfg.running_run and n == len(specs) - 1
        ckpt = None if running else f"runs/{s['run_id']}/checkpoints/final.pt"
        if ckpt and not (cfg.deleted_checkpoint and n == 1):
            (root / ckpt).parent.mkdir(parents=True, exist_ok=True)
            (root / ckpt).write_bytes(b"seed checkpoint placeholder")
        run_rows.append(dict(
            run_id=s["run_id"], kind=s["kind"], task=s["task"], init=s["init"], encoder="resnet18",
            fraction=s["fraction"], seed=s["seed"], profile="seed", benchmark_id=BENCHMARK_ID,
            dataset="synthetic", config=json.dumps({"lr": 1e-3}), code_version="seed",
            status="running" if running else "succeeded", created_at=T0 + timedelta(minutes=n),
            ended_at=None if running else T0 + timedelta(minutes=n + 30), wall_s=None if running else 1800.0,
            run_dir=f"runs/{s['run_id']}", checkpoint=ckpt, error=None))
    run_by_key = {(s["task"], s["init"], s["fraction"], s["seed"]): s["run_id"] for s in specs if s["kind"] == "finetune"}
    with connect(sp.db) as con:
        ensure_schema(con)
        _insert_df(con, "runs", pd.DataFrame(run_rows))
        n_rows, spike_run, spike_step = _insert_metrics(con, cfg, specs, rng)
        results = _results_rows(cfg, rng, run_by_key)
        _insert_df(con, "results", results)
        _insert_df(con, "summaries", _summary_rows(results))
        _insert_df(con, "benchmarks", pd.DataFrame([dict(
            benchmark_id=BENCHMARK_ID, profile="seed", dataset="synthetic", config=json.dumps({}),
            status="succeeded", started_at=T0, ended_at=T0 + timedelta(hours=3), wall_s=10800.0)]))
        _seed_catalog(con, root, cfg, rng)
    emb_ids, projections = _seed_embeddings(root, cfg, rng)   # production writers: their own connections
    with connect(sp.db) as con:
        _insert_df(con, "projections", projections)
        # save_embeddings stamps the wall clock; the seeded store stays deterministic
        con.execute("UPDATE embeddings SET created_at = ? WHERE emb_id IN (SELECT unnest(?))", [T0, emb_ids])
        _insert_df(con, "bias_results", _bias_rows(emb_ids))
    return SeedSummary(root=root, run_ids=[s["run_id"] for s in specs], n_metric_rows=n_rows, emb_ids=emb_ids,
                       spike_run=spike_run, spike_step=spike_step)


def seed_old_schema_store(root: str | Path) -> Path:
    """A store as an older ctssl wrote it: fewer tables, fewer columns (no CIs, no embeddings/bias tables).

    Used to check that every page degrades to a clear message instead of a stack trace.
    """
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    db = store_paths(root).db
    with connect(db) as con:
        con.execute("CREATE TABLE runs (run_id TEXT, kind TEXT, task TEXT, init TEXT, status TEXT)")
        con.execute("INSERT INTO runs VALUES ('old-1', 'finetune', 'pe', 'random', 'succeeded'), "
                    "('old-2', 'finetune', 'pe', 'rotation', 'succeeded')")
        con.execute("CREATE TABLE metrics (run_id TEXT, step BIGINT, name TEXT, value DOUBLE)")
        con.execute("INSERT INTO metrics SELECT 'old-1', i, 'train/loss', 1.0 / (i + 1) FROM range(50) t(i)")
        con.execute("CREATE TABLE results (task TEXT, init TEXT, fraction DOUBLE, metric TEXT, value DOUBLE)")
        con.execute("INSERT INTO results VALUES ('pe', 'random', 1.0, 'slice_auroc', 0.80), "
                    "('pe', 'rotation', 1.0, 'slice_auroc', 0.82)")
        con.execute("CREATE TABLE patients (patient_key TEXT, age DOUBLE, sex TEXT)")
        con.execute("INSERT INTO patients VALUES ('k1', 50, 'F'), ('k2', 60, 'M')")
    return Path(root)
