"""Family-wise false-positive rate and power of the WHOLE bias analysis, measured by simulation.

Null: each draw makes patient embeddings independent of every attribute, at
realistic sizes (36-200 patients, 8-64 dims, 1-3 slices per patient, a random
decaying spectrum so a few PCA modes dominate as in trained encoders), with the
synthetic cohort's attribute mix (age 25-85, sex 50/50, race 55/25/20 %,
control_group A/B). ``bias.analyse_arrays`` then runs every test on every
attribute (probes, KS on PCA modes, k-NN separability), corrected as one
family per encoder. A draw is a family-wise error when ANY test is flagged.
The subgroup analysis (a PE model's gaps between groups) is a second family;
its null (scores independent of groups) is measured beside it.

Power: the same analysis on the synthetic cohort's own planted effects at
their configured strengths (``SynthConfig`` knobs: age 1.0, sex 1.0, race 0.5),
rendered by the phantom and read through encoder-free raw-HU features
(``embed.hu_features``): the share of draws in which each planted attribute is
detected by each analysis, and control_group (no correlate) is not.

    python experiments/bias_null.py [--draws 200] [--power-draws 40] [--seed 0]

The test (tests/test_bias_null.py) runs a seeded, bounded version.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ctssl_core.bias import BiasConfig, analyse_arrays, subgroup_rows

RACES, RACE_P = ("RaceA", "RaceB", "RaceC"), (0.55, 0.25, 0.20)


@dataclass
class NullSizes:
    """Ranges one draw samples its size from (inclusive)."""

    patients: tuple[int, int] = (36, 200)
    dims: tuple[int, int] = (8, 64)
    slices: tuple[int, int] = (1, 3)


def null_draw(rng: np.random.Generator, sizes: NullSizes = NullSizes()) -> tuple[np.ndarray, pd.DataFrame]:
    """Slice embeddings (rows) and keys of one null cohort: embeddings independent of every attribute."""
    P = int(rng.integers(sizes.patients[0], sizes.patients[1] + 1))
    D = int(rng.integers(sizes.dims[0], sizes.dims[1] + 1))
    S = int(rng.integers(sizes.slices[0], sizes.slices[1] + 1))
    scale = 1.0 / np.sqrt(1 + np.arange(D)) * rng.uniform(0.5, 2.0, D)         # decaying spectrum
    mix = np.linalg.qr(rng.normal(size=(D, D)))[0]
    Xp = (rng.normal(size=(P, D)) * scale) @ mix
    E = np.repeat(Xp, S, 0) + 0.2 * rng.normal(size=(P * S, D)) * scale @ mix
    pk = np.array([f"n{i:04d}" for i in range(P)])
    keys = pd.DataFrame({"patient_key": np.repeat(pk, S),
                         "age": np.repeat(rng.uniform(25, 85, P).round(1), S),
                         "sex": np.repeat(rng.choice(["F", "M"], P), S),
                         "race": np.repeat(rng.choice(RACES, P, p=RACE_P), S),
                         "control_group": np.repeat(rng.choice(["A", "B"], P), S)})
    return E.astype(np.float32), keys


def null_scores(rng: np.random.Generator, keys: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Null PE scores (test, validation) for the patients of ``keys``: informative about the label, not the group."""
    pk = keys["patient_key"].drop_duplicates().to_numpy()
    y = (rng.random(len(pk)) < 0.4).astype(int)
    test = pd.DataFrame({"patient_key": pk, "score": 1 / (1 + np.exp(-(rng.normal(size=len(pk)) + 1.5 * y - 0.6))),
                         "label": y})
    yv = (rng.random(len(pk)) < 0.4).astype(int)
    val = pd.DataFrame({"score": 1 / (1 + np.exp(-(rng.normal(size=len(pk)) + 1.5 * yv - 0.6))), "label": yv})
    return test, val


def simulate_null(n_draws: int, seed: int = 0, sizes: NullSizes = NullSizes(), cfg: BiasConfig | None = None,
                  subgroups: bool = True, say=None) -> pd.DataFrame:
    """One row per null draw: size, whether any test of the encoder family / subgroup family was flagged,
    and (for contrast) whether any raw, uncorrected p-value was below alpha."""
    cfg = cfg or BiasConfig(n_boot=50)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_draws):
        E, keys = null_draw(rng, sizes)
        df = analyse_arrays(E, keys, None, cfg)
        row = dict(draw=i, patients=keys.patient_key.nunique(), dims=E.shape[1],
                   encoder_flag=bool(df["flagged"].fillna(False).astype(bool).any()),
                   encoder_raw=bool((df["p_value"].astype(float) < cfg.alpha).any()),
                   flagged=";".join(sorted({f"{r.analysis}:{r.attribute}" for r in df[df.flagged == True].itertuples()})))  # noqa: E712
        if subgroups:
            test, val = null_scores(rng, keys)
            attrs = keys.drop_duplicates("patient_key")
            sg = subgroup_rows(test, attrs, cfg, val_scores=val)
            gaps = sg[sg["metric"].astype(str).str.endswith("_gap")]
            row.update(subgroup_flag=bool(gaps["flagged"].fillna(False).astype(bool).any()),
                       subgroup_raw=bool((gaps["p_value"].astype(float) < cfg.alpha).any()), n_gaps=len(gaps))
        out.append(row)
        if say is not None:
            say(f"draw {i}: {row}")
    return pd.DataFrame(out)


def power_draws(n_draws: int, seed: int = 0, patients: int = 120, slices: int = 4, size: int = 64,
                cfg: BiasConfig | None = None, say=None) -> pd.DataFrame:
    """Detection per (draw, analysis, attribute) on rendered synthetic cohorts at the configured knobs."""
    from ctssl_core.data.phantom import phantom_volume
    from ctssl_core.data.synth import STREAM_RENDER, SynthConfig, _rng, sample_patient
    from ctssl_core.embed import hu_features

    cfg = cfg or BiasConfig(n_boot=50)
    rows = []
    for d in range(n_draws):
        scfg = SynthConfig(n_patients=patients, slices_per_exam=slices, image_size=size, seed=seed + d, workers=1)
        feats, keys = [], []
        for i in range(patients):
            p = sample_patient(scfg, i)
            hu = phantom_volume(p, _rng(scfg, i, STREAM_RENDER))[0]
            feats.append(hu_features(hu))
            keys += [dict(patient_key=f"s{i:04d}", age=p.age, sex=p.sex, race=p.race, control_group=p.control_group)] * len(hu)
        df = analyse_arrays(np.concatenate(feats), pd.DataFrame(keys), None, cfg)
        for (analysis, attr), g in df[df.analysis.isin(["probe", "ks", "separability"])].groupby(["analysis", "attribute"]):
            rows.append(dict(draw=d, analysis=analysis, attribute=attr, detected=bool(g["flagged"].fillna(False).any())))
        if say is not None:
            say(f"power draw {d}: " + ", ".join(f"{r['analysis']}:{r['attribute']}={int(r['detected'])}" for r in rows if r["draw"] == d))
    return pd.DataFrame(rows)


def binomial_ci(k: int, n: int) -> tuple[float, float]:
    """Clopper-Pearson 95% interval of a rate k/n."""
    from scipy.stats import beta

    lo = beta.ppf(0.025, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--power-draws", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print each draw as it finishes")
    args = ap.parse_args()
    cfg = BiasConfig(n_boot=50)
    t0 = time.perf_counter()
    log = (lambda m: print(m, flush=True)) if args.verbose else None
    null = simulate_null(args.draws, args.seed, cfg=cfg, say=log) if args.draws else None
    if null is not None:
        report_null(null, t0)
    if args.power_draws:
        report_power(args, cfg, log)


def report_null(null: pd.DataFrame, t0: float) -> None:
    n = len(null)
    print(f"null: {n} draws, {null.patients.min()}-{null.patients.max()} patients, {null.dims.min()}-{null.dims.max()} "
          f"dims ({time.perf_counter() - t0:.0f}s)")
    for col, what in (("encoder_flag", "encoder family (probes + KS + separability, all attributes), corrected"),
                      ("encoder_raw", "encoder tests, uncorrected p < alpha"),
                      ("subgroup_flag", "subgroup gaps, Holm-corrected"), ("subgroup_raw", "subgroup gaps, uncorrected")):
        k = int(null[col].sum())
        lo, hi = binomial_ci(k, n)
        print(f"  FWER {what}: {k}/{n} = {k / n:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    k = int((null.encoder_flag | null.subgroup_flag).sum())
    print(f"  any flag in either family: {k}/{n} = {k / n:.3f}")
    print("  flags seen:", null.loc[null.flagged != "", "flagged"].tolist())


def report_power(args, cfg: BiasConfig, log) -> None:
    if args.power_draws:
        t0 = time.perf_counter()
        pw = power_draws(args.power_draws, args.seed + 1000, cfg=cfg, say=log)
        print(f"\npower: {args.power_draws} synthetic cohorts x 120 patients, raw-HU features, knobs age 1.0 / sex 1.0 / "
              f"race 0.5 ({time.perf_counter() - t0:.0f}s)")
        tab = pw.pivot_table(index="attribute", columns="analysis", values="detected", aggfunc="mean")
        any_ = pw.groupby(["attribute", "draw"])["detected"].any().groupby("attribute").mean().rename("any")
        print(tab.join(any_).to_string(float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
