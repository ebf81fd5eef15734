"""`ctssl benchmark --profile smoke|quick|paper`: the whole study, resumable, into the store."""

from __future__ import annotations

HELP = ("Run the full benchmark: synthesize+ingest if needed, pretrain every strategy, fine-tune every "
        "downstream task at every label fraction from every init, probes, embeddings; resumable.")


def add_arguments(p) -> None:
    p.add_argument("--profile", default="quick", help="smoke (<=2 min CPU), quick (<=15 min CPU), paper (GPU), "
                                                     "or a YAML path")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile key, e.g. --set benchmark.fractions=[0.1,1.0] (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from ctssl_core.benchmark import run_benchmark

    res = run_benchmark(args.profile, args.store, args.overrides, progress=not args.quiet)
    print(f"benchmark {res['benchmark_id']}: {res['ran']} units run, {res['skipped']} reused, "
          f"{res['wall_s']:.0f}s")
    return 0
