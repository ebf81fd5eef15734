"""`ctssl benchmark --profile smoke|quick|paper`: the whole study, resumable, into the store."""

from __future__ import annotations

from ctssl_core.cli import add_label_options, add_progress_option, add_set_option, add_track_option
from ctssl_core.config import SECTION_READERS

SECTION = "benchmark"  # `--set KEY=...` means benchmark.KEY
READS = tuple(SECTION_READERS)  # the whole profile

HELP = ("Run the full benchmark: synthesize+ingest if needed, pretrain every strategy, fine-tune every "
        "downstream task at every label fraction from every init, probes, embeddings; resumable.")


def add_arguments(p) -> None:
    p.add_argument("--profile", default="quick", help="smoke (<=2 min CPU), quick (<=15 min CPU), paper (GPU), "
                                                     "or a YAML path")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    add_set_option(p, SECTION, "pretrain.train.steps=50 --set benchmark.fractions=[0.1,1.0]")
    add_progress_option(p)
    add_track_option(p)
    add_label_options(p)


def run(args) -> int:
    from ctssl_core.benchmark import run_benchmark
    from ctssl_core.cli import label_args
    from ctssl_core.config import profile_overrides

    labels = label_args(args)  # a bad tag stops here, before any data or run row is made
    overrides = profile_overrides(args.overrides, "benchmark", SECTION, reads=READS)
    if args.track:  # before the study: a typo or a missing extra fails now
        from ctssl_core.trackers import check_targets

        check_targets(args.track)
    res = run_benchmark(args.profile, args.store, overrides, progress=not args.no_progress, labels=labels)
    print(f"benchmark {res['benchmark_id']}: {res['ran']} units run, {res['skipped']} reused, "
          f"{res['wall_s']:.0f}s")
    if args.track:
        from ctssl_core.paths import store_paths
        from ctssl_core.trackers import benchmark_runs, mirror_many

        root = store_paths(args.store).root
        mirror_many(root, benchmark_runs(root, res["benchmark_id"]), args.track)
    return 0


def interrupted_hint(args, exc) -> str:
    return "re-run the same command to resume: finished runs are reused, the interrupted one starts again."
