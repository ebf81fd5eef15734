"""`ctssl track RUN_ID... --to mlflow:URI|tensorboard:DIR|wandb:DIR`: mirror finished runs into an experiment tracker."""

from __future__ import annotations

from ctssl_core.cli import add_track_option

HELP = "mirror finished runs (params, metric series, results, tags, export) to MLflow, TensorBoard or W&B (offline)"


def add_arguments(p) -> None:
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to mirror (or --benchmark ID)")
    p.add_argument("--benchmark", default=None, metavar="BENCHMARK_ID", help="mirror every finished run of a benchmark")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    add_track_option(p, "--to", required=True)


def run(args) -> int:
    from ctssl_core.config import ConfigError
    from ctssl_core.paths import store_paths
    from ctssl_core.trackers import benchmark_runs, check_targets, mirror_many

    check_targets(args.track)
    root = store_paths(args.store).root
    runs = list(args.run_ids) + (benchmark_runs(root, args.benchmark) if args.benchmark else [])
    if not runs:
        raise ConfigError("nothing to mirror: give RUN_ID(s) or --benchmark ID" if not args.benchmark else
                          f"benchmark {args.benchmark!r} has no finished runs in {root}")
    written = mirror_many(root, runs, args.track)
    return 0 if written == len(runs) * len(args.track) else 1   # each failure was said, with its retry command
