"""`ctssl pretrain`: self-supervised pretraining of one strategy on the slice store."""

from __future__ import annotations

HELP = "pretrain an encoder with one self-supervised strategy (masked_region, next_slice, rotation, flip, denoise, composite)"


def add_arguments(p) -> None:
    p.add_argument("--task", default=None, help="pretext task key (required unless --resume)")
    p.add_argument("--profile", default=None, help="profile whose `pretrain:` section sets defaults: smoke | quick | paper "
                                                   "(default: quick when it exists)")
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file with a `pretrain:` section (or just its keys)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=500 --set encoder=resnet18 "
                        "(TrainConfig keys may drop the `train.` prefix)")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="continue a stopped run exactly where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run(args) -> int:
    from ctssl_core.config import ConfigError
    from ctssl_core.pretrain import run_pretrain

    if not args.task and not args.resume:
        from ctssl_core.pretext import PRETEXT

        raise ConfigError(f"give --task (one of {sorted(PRETEXT)}) or --resume RUN_ID")
    res = run_pretrain(args.task, store_root=args.store, profile=args.profile, config_path=args.config,
                       overrides=args.overrides, resume_run_id=args.resume, progress=not args.no_progress)
    from ctssl_core.distributed import env_world

    if env_world()[0] == 0:  # under torchrun only rank 0 prints the run id
        print(res.run_id)
    return 0 if res.status in ("succeeded", "cancelled") else 1
