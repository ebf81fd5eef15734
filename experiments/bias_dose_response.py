"""Race dose-response of a finished benchmark's encoders (issue 15 item 1; ctssl_core/dose.py).

The patients the benchmark's bias analysis embedded are rendered again in memory with the planted
race effect at 0, half and full strength (same patients, same noise; only the knob changes), embedded
by random init and every pretrained encoder of the benchmark, and the race analyses of bias.py run on
each. Detection at strength 0 is a false positive of the analysis (the negative control without
pretraining again); detection should rise with the strength.

Run it after the benchmark, on the same store (smoke or quick; the store's slice size must equal the
cohort's image size, as for the PE twins):

    python -m ctssl_core.cli benchmark --profile smoke --store /tmp/s
    python experiments/bias_dose_response.py --profile smoke --store /tmp/s [--strengths 0 0.25 0.5]

Prints the table and the per-encoder sentences and writes
experiments/results/bias_dose_<profile>_<date>.csv (or --out).

Cost without a benchmark (``--stand-ins N``): the profile's whole cohort rendered in memory and N random-init
encoders of the profile's architecture standing in for random init + the strategies (same architecture, same
cost; their numbers are random-init numbers, not the strategies'):

    python experiments/bias_dose_response.py --profile quick --stand-ins 6
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path


def stand_ins(plan, n: int):
    """(SynthConfig, every patient, n random-init encoders, DoseConfig) from the profile alone."""
    import torch

    from ctssl_core.plan import input_windows, pretrain_encoder
    from ctssl_core.config import build
    from ctssl_core.data.synth import SynthConfig
    from ctssl_core.dose import DoseConfig
    from ctssl_core.models import build_encoder

    synth_cfg = build(SynthConfig, plan.config.get("synth") or {}, where="synth.")
    name, kw = pretrain_encoder(plan.config)
    encoders = {}
    for k in range(n):
        torch.manual_seed(k)
        encoders[f"random-s{k}"] = build_encoder(name, windows=input_windows(plan.config), **kw)
    emb = plan.config.get("embed") or {}
    dcfg = DoseConfig(batch_size=int(emb.get("batch_size", 64)), max_per_series=int(emb.get("max_per_series", 0)))
    return synth_cfg, list(range(synth_cfg.n_patients)), encoders, dcfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="smoke", help="the benchmark profile the store was built by")
    ap.add_argument("--store", default="", help="the benchmark's store folder")
    ap.add_argument("--stand-ins", type=int, default=0,
                    help="no store: render the profile's cohort and use this many random-init encoders (cost)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="the benchmark's overrides, if any")
    ap.add_argument("--strengths", type=float, nargs="*", default=[], help="race_effect values (default 0, half, full)")
    ap.add_argument("--out", default="", help="CSV path (default experiments/results/bias_dose_<profile>_<date>.csv)")
    args = ap.parse_args(argv)

    import dataclasses

    import pandas as pd

    from ctssl_core import bias
    from ctssl_core.plan import make_plan
    from ctssl_core.config import ConfigError, build
    from ctssl_core.dose import benchmark_embeddings, dose_response, dose_sentence, plan_inputs

    t0, c0 = time.perf_counter(), time.process_time()
    if not args.store and args.stand_ins < 1:
        print("error: give --store (a finished benchmark's store) or --stand-ins N", file=sys.stderr)
        return 2
    plan = make_plan(args.profile, args.overrides)
    if plan.bench.threads:   # as run_benchmark: one thread is far faster on a CPU shared with other jobs
        import torch

        torch.set_num_threads(plan.bench.threads)
    try:
        if args.stand_ins:
            synth_cfg, indices, encoders, dcfg = stand_ins(plan, args.stand_ins)
        else:
            synth_cfg, indices, encoders, dcfg = plan_inputs(plan, args.store, benchmark_embeddings(plan, args.store))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.strengths:
        dcfg = dataclasses.replace(dcfg, strengths=tuple(args.strengths))
    bcfg = build(bias.BiasConfig, dict(plan.config.get("bias") or {}), where="bias.")
    print(f"{plan.benchmark_id}: {len(indices)} patients, encoders {sorted(encoders)}, configured race_effect "
          f"{synth_cfg.race_effect:g}")
    df = dose_response(indices, synth_cfg, encoders, dcfg, bcfg, log=print)
    secs = time.perf_counter() - t0
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for enc in encoders:
        for analysis in ("probe", "ks", "separability"):
            print(dose_sentence(df, enc, analysis))
    print(f"wall {secs:.1f} s, CPU {time.process_time() - c0:.1f} s (rendering, embedding and analysis)")
    out = Path(args.out) if args.out else (Path(__file__).parent / "results" /
                                           f"bias_dose_{plan.profile}_{date.today().isoformat()}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    df.assign(benchmark_id=plan.benchmark_id, patients=len(indices)).to_csv(out, index=False)
    repo = Path(__file__).resolve().parent.parent
    print(f"wrote {out.resolve().relative_to(repo) if out.resolve().is_relative_to(repo) else out.name}")   # no path of the machine
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
