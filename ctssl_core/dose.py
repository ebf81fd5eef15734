"""Race dose-response: the same patients re-rendered with the planted race effect turned down.

Why: the scorecard says whether the bias analysis finds the planted race effect at its one
configured strength; it cannot say whether a "hit" comes from the effect or from something else
that happens to differ between the groups. Here the test patients are rendered again in memory
with ``SynthConfig.race_effect`` at 0, half and full strength (by default): same patients, same
anatomy, same noise draw, only the knob changes (``sample_patient`` takes every random draw from
streams that do not depend on the knob; ``twins.render_stored`` uses the generator's own render
stream). Each encoder embeds every render, and the race analyses of ``bias.analyse_arrays``
(nested-CV probe with its exact permutation test, KS on the top PCA modes, k-NN separability)
run on the embeddings. At strength 0 race has no imaging correlate, so detection must sit at
chance: the negative control, without pretraining again. Detection should then rise with the
strength.

What changes with the knob (``data/synth.py``): for race code c (first label 0, so its patients
render byte-identically at any strength) the subcutaneous fat HU (+12 c), the cancellous bone HU
(+10 c) and the body's AP depth (x (1 + 0.04 c)); the AP depth moves the anatomy inside the body,
nodule centres included (they are placed relative to the lung outline). PE defects, demographics
and every other parameter are identical (tests/test_dose.py checks this).

The renders equal what ingest stored (same HU, same slice order and size; the test compares them
with the smoke store's slices); stores whose slice size differs from the cohort's are refused
(``twins.TwinUnavailable``), as for the PE twins. Nothing is written: the pure function returns a
table; ``dose_rows`` turns it into benchmark summary rows (task ``bias_dose``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ctssl_core.config import ConfigError
from ctssl_core.db import StoreError

DOSE_ANALYSES = ("probe", "ks", "separability")
DOSE_COLUMNS = ["encoder", "strength", "analysis", "metric", "statistic", "chance", "p_value", "p_adjusted",
                "detected", "n"]
ATTRIBUTE = "race"


@dataclass
class DoseConfig:
    strengths: tuple[float, ...] = ()   # race_effect values; () = (0, configured / 2, configured)
    batch_size: int = 64
    device: str = "cpu"
    max_per_series: int = 0             # as embed.max_per_series: 0 = every slice, else evenly spaced ones

    def __post_init__(self) -> None:
        bad = [s for s in self.strengths if not np.isfinite(s) or s < 0]
        if bad:
            raise ConfigError(f"dose strengths must be race_effect values >= 0 (got {bad})")
        if self.batch_size < 1 or self.max_per_series < 0:
            raise ConfigError(f"dose batch_size must be >= 1 and max_per_series >= 0 (got {self.batch_size}, "
                              f"{self.max_per_series})")


def strengths_for(synth_cfg, strengths: tuple[float, ...] | list[float] = ()) -> tuple[float, ...]:
    """The race-effect strengths to render: the given ones (sorted, unique), or 0, half and the configured one."""
    if strengths:
        return tuple(sorted({float(s) for s in strengths}))
    full = float(synth_cfg.race_effect)
    if full <= 0:
        raise ConfigError("the cohort was generated with synth.race_effect = 0: there is no planted race effect "
                          "to turn down; give the strengths to render explicitly")
    return (0.0, full / 2, full)


def slice_positions(n_slices: int, max_per_series: int) -> np.ndarray:
    """Positions (store order) of the slices the embedder takes from a series of ``n_slices``
    (``embed.even_per_series``, the one implementation of that choice)."""
    from ctssl_core.embed import even_per_series

    keys = pd.DataFrame({"series_key": ["s"] * n_slices, "pos": np.arange(n_slices)})
    return even_per_series(keys, max_per_series)["pos"].to_numpy()


def render_at(synth_cfg, indices, strength: float, max_per_series: int = 0,
              cache: dict | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """The slices the embedder would take of cohort patients ``indices``, rendered with ``race_effect =
    strength``: int16 HU (N, H, W) and keys (patient_key = the cohort index as text, race, idx).

    ``cache`` (a dict kept across strengths) reuses a render whose patient parameters are equal, e.g.
    every patient of the first race label, whose code is 0: the render is a function of the parameters
    and the patient's own rng stream, so equal parameters give identical bytes.
    """
    from ctssl_core.data.synth import sample_demographics, sample_patient
    from ctssl_core.twins import render_stored

    cfg = dataclasses.replace(synth_cfg, race_effect=float(strength))
    pos = slice_positions(cfg.slices_per_exam, max_per_series)
    vols, rows = [], []
    for i in map(int, indices):
        if not 0 <= i < cfg.n_patients:
            raise ConfigError(f"patient index {i} is outside the cohort (0..{cfg.n_patients - 1})")
        p = sample_patient(cfg, i)
        hit = cache.get(i) if cache is not None else None
        if hit is not None and hit[0] == p:
            hu = hit[1]
        else:
            hu = render_stored(cfg, i, p)[0][pos]                                   # (S', H, W) int16
            if cache is not None:
                cache[i] = (p, hu)
        vols.append(hu)
        race = sample_demographics(cfg, i)["race"]
        rows += [(str(i), race, int(k)) for k in pos]
    if not vols:
        raise ConfigError("no patients to render for the dose-response")
    return np.concatenate(vols), pd.DataFrame(rows, columns=["patient_key", ATTRIBUTE, "idx"])


def race_rows(results: pd.DataFrame, encoder: str, strength: float) -> list[dict[str, Any]]:
    """One row per analysis from ``bias.analyse_arrays``'s race rows: the probe's headline metric, the
    strongest KS test (largest D, smallest p; detected if any flags) and the separability test."""
    from ctssl_core.bias import CHANCE

    out = []
    r = results[results["attribute"] == ATTRIBUTE]
    for analysis in DOSE_ANALYSES:
        d = r[(r["analysis"] == analysis) & r["flagged"].notna()]
        if d.empty:
            out.append(dict(encoder=encoder, strength=strength, analysis=analysis, metric="not run",
                            statistic=np.nan, chance=np.nan, p_value=np.nan, p_adjusted=np.nan, detected=None, n=0))
            continue
        if analysis == "probe":
            d = d.iloc[[0]]                                   # the headline metric comes first (KIND_METRICS)
            metric = str(d["metric"].iloc[0])
            chance = CHANCE.get(metric, np.nan)
        elif analysis == "ks":
            metric, chance = "ks_max_d", np.nan
        else:
            metric, chance = "knn_balanced_accuracy", float(pd.to_numeric(d["ci_low"]).iloc[0])   # null mean
        out.append(dict(encoder=encoder, strength=strength, analysis=analysis, metric=metric,
                        statistic=float(pd.to_numeric(d["value"]).max()), chance=chance,
                        p_value=float(pd.to_numeric(d["p_value"]).min()),
                        p_adjusted=float(pd.to_numeric(d["p_adjusted"]).min()),
                        detected=bool(d["flagged"].astype(bool).any()), n=int(pd.to_numeric(d["n"]).max())))
    return out


def dose_response(indices, synth_cfg, encoders: dict[str, Any], cfg: DoseConfig | None = None,
                  bias_cfg=None, log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Race detection by each encoder at each race-effect strength, on the same patients.

    ``indices``: cohort patient indices (e.g. the test patients); ``synth_cfg``: the cohort's
    ``SynthConfig``; ``encoders``: name -> encoder (``embed`` interface, its own ``windows``);
    ``bias_cfg``: the ``BiasConfig`` of the analysis (its ``attributes`` are replaced by race alone,
    so the family is the race tests: corrected over 3, not over every attribute). Returns the tidy
    table ``DOSE_COLUMNS``: one row per (encoder, strength, analysis).
    """
    from ctssl_core import bias
    from ctssl_core.embed import embed_array

    cfg = cfg or DoseConfig()
    say = log or (lambda m: None)
    bcfg = dataclasses.replace(bias_cfg or bias.BiasConfig(), attributes=(ATTRIBUTE,))
    if not encoders:
        raise ConfigError("dose_response needs at least one encoder")
    rows: list[dict[str, Any]] = []
    cache: dict = {}
    for s in strengths_for(synth_cfg, cfg.strengths):
        hu, keys = render_at(synth_cfg, indices, s, cfg.max_per_series, cache)
        say(f"dose: race_effect {s:g}: {keys['patient_key'].nunique()} patients, {len(hu)} slices rendered")
        for name, enc in encoders.items():
            E = embed_array(enc, lambda ids: hu[ids], np.arange(len(hu)), cfg.batch_size, cfg.device)   # (N, D)
            res = bias.analyse_arrays(E, keys, None, bcfg, emb_id=f"dose-{name}-{s:g}")
            rows += race_rows(res, name, s)
    return pd.DataFrame(rows, columns=DOSE_COLUMNS)


def dose_sentence(df: pd.DataFrame, encoder: str, analysis: str = "probe") -> str:
    """'random: probe macro_auroc 0.51 / 0.55 / 0.62 at race_effect 0 / 0.25 / 0.5 (detected at 0.5)'."""
    d = df[(df["encoder"] == encoder) & (df["analysis"] == analysis)].sort_values("strength")
    if d.empty:
        return f"{encoder}: no {analysis} rows"
    vals = " / ".join("n/r" if not np.isfinite(v) else f"{v:.2f}" for v in d["statistic"])
    at = " / ".join(f"{s:g}" for s in d["strength"])
    det = [f"{s:g}" for s, x in zip(d["strength"], d["detected"]) if x is True or x == 1]
    zero = d[d["strength"] == 0]
    warn = (" - WRONG: detected with no planted effect" if len(zero) and bool(zero["detected"].fillna(False).any())
            else "")
    return (f"{encoder}: {analysis} {d['metric'].iloc[0]} {vals} at race_effect {at} "
            f"(detected at {', '.join(det) if det else 'none'}){warn}")


# ---------------------------------------------------------------- the benchmark's encoders and patients


def benchmark_embeddings(plan, root: str | Path) -> dict[str, dict[str, str]]:
    """init -> {'slice', 'exam'} embedding ids of the benchmark's finished embed units (as ``run_benchmark``
    collects them), for a script that runs after the benchmark."""
    import json

    from ctssl_core.paths import store_paths

    out = {}
    for u in plan.units:
        p = store_paths(root).run_dir(u.run_id) / "embeddings.json"
        if u.kind == "embed" and p.exists():
            out[u.init] = json.loads(p.read_text())
    return out


def plan_inputs(plan, root: str | Path, embeddings: dict[str, dict[str, str]]):
    """What the benchmark's bias analysis saw, to render it again: (SynthConfig, cohort patient indices of
    the embedded patients, {init: encoder}, DoseConfig with the embedder's slices and batch size).

    The encoders are the ones the embeddings were made with (``embed.resolve_encoder`` of each embedding's
    run, random init with the embedder's seed); the patients are those of the random-init (or first)
    slice embedding. Raises ``twins.TwinUnavailable`` when the store cannot be re-rendered.
    """
    from ctssl_core import twins
    from ctssl_core.plan import embed_config
    from ctssl_core.data.store import SliceStore
    from ctssl_core.embed import load_embeddings, resolve_encoder
    from ctssl_core.paths import store_paths

    if not (Path(plan.cohort) / "truth.json").is_file():
        raise twins.TwinUnavailable(f"no synthetic cohort at {plan.cohort}: the dose-response re-renders its patients")
    if not embeddings:
        raise ConfigError("no embeddings of this benchmark: run the benchmark (with probes or bias) first")
    synth_cfg = twins.cohort_config(plan.cohort)
    store = SliceStore.open(root)
    index = twins.patient_indices(plan.cohort, store_paths(root).secret)
    if not set(store.patients["patient_key"].astype(str)) <= set(index):
        raise twins.TwinUnavailable("the store holds patients that are not this benchmark's synthetic cohort")
    ecfg = embed_config(plan.config, plan.bench)
    first = embeddings.get("random") or next(iter(embeddings.values()))
    _, keys, _ = load_embeddings(root, first["slice"])
    size = int(store.read(store.slice_ids[:1]).shape[-1])
    if synth_cfg.image_size != size:
        raise twins.TwinUnavailable(f"the cohort renders {synth_cfg.image_size}-px slices but the store holds "
                                    f"{size}-px ones; build the store with ingest.size = synth.image_size")
    indices = sorted(index[k] for k in keys["patient_key"].astype(str).unique())
    encoders = {}
    for init, ids in embeddings.items():
        run_id = load_embeddings(root, ids["slice"])[2]["run_id"]
        if not run_id and init != "random":   # never stand a random encoder in for a trained one
            raise ConfigError(f"the {init} embedding {ids['slice']} names no encoder run; re-run the benchmark's "
                              f"embed unit for {init} (delete its run folder) before the dose-response")
        encoders[init] = resolve_encoder(run_id or "random", root, ecfg)[0]
    dcfg = DoseConfig(batch_size=ecfg.batch_size, device=ecfg.device, max_per_series=ecfg.max_per_series)
    return synth_cfg, indices, encoders, dcfg


def dose_rows(plan, root: str | Path, embeddings: dict[str, dict[str, str]],
              log: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], list[str], pd.DataFrame]:
    """The dose-response of every benchmark encoder -> (summary rows with task 'bias_dose', lines, table),
    when the profile asks for it (``bias.dose_response: true``); else nothing.

    Summary rows: metric ``race_<analysis>@<strength>``, value the statistic, note the test's metric, its
    chance level (null mean for separability, nan for KS), the corrected p and the verdict
    (``read.bias_dose`` parses them). ci_low / ci_high are null: these statistics have no CI here, and
    every reader of summaries takes those columns for a CI's bounds (the chance level once stood in
    ci_low). Nothing (with a line saying why) when the store cannot be re-rendered.
    """
    from ctssl_core import bias, twins
    from ctssl_core.config import build

    say = log or (lambda m: None)
    bcfg = build(bias.BiasConfig, dict(plan.config.get("bias") or {}), where="bias.")
    if not bcfg.dose_response:
        return [], [], pd.DataFrame(columns=DOSE_COLUMNS)
    try:
        synth_cfg, indices, encoders, dcfg = plan_inputs(plan, root, embeddings)
        df = dose_response(indices, synth_cfg, encoders, dcfg, bcfg, log=say)
    except (ConfigError, StoreError) as e:   # an optional step: the benchmark's own summaries are still written
        return [], [f"race dose-response: not computed ({type(e).__name__}: {e})"], pd.DataFrame(columns=DOSE_COLUMNS)
    rows = [{"benchmark_id": plan.benchmark_id, "task": "bias_dose", "init": r.encoder,
             "metric": f"race_{r.analysis}@{r.strength:g}", "value": None if not np.isfinite(r.statistic) else r.statistic,
             "ci_low": None, "ci_high": None,
             "note": (f"{r.metric}; chance {r.chance:.6g}; corrected p {r.p_adjusted:.3g} ({bcfg.correction} over "
                      f"the race tests only, "
                      f"not the scorecard's whole family); "
                      + ("detected" if r.detected else "not detected" if r.detected is not None else "not run"))}
            for r in df.itertuples()]
    lines = [f"race dose-response ({len(indices)} patients re-rendered at race_effect "
             f"{', '.join(f'{s:g}' for s in sorted(df['strength'].unique()))}; same patients and noise; "
             f"detection at 0 is a false positive):"]
    lines += [f"  {dose_sentence(df, enc, a)}" for enc in encoders for a in ("probe", "separability")]
    return rows, lines, df
