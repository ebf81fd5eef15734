"""`ctssl pretrain`: self-supervised pretraining of one strategy on the slice store."""

from __future__ import annotations

import re

from ctssl_core.cli import (EXIT_FAILED, EXIT_OK, EXIT_SIGTERM, add_label_options, add_progress_option,
                            add_set_option, add_track_option)

SECTION = "pretrain"  # the profile section this command reads (`--set KEY=...` means pretrain.KEY)
HELP = "pretrain an encoder with one self-supervised strategy (masked_region, next_slice, rotation, flip, denoise, composite)"

# run_pretrain announces its run as "run RUN_ID: ..." before training starts
_RUN_LINE = re.compile(r"run (\S+): ")


def add_arguments(p) -> None:
    p.add_argument("--task", default=None, help="pretext task key (required unless --resume)")
    p.add_argument("--profile", default=None, help="profile whose `pretrain:` section sets defaults: smoke | quick | paper "
                                                   "(default: quick when it exists)")
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file with a `pretrain:` section (or just its keys)")
    add_set_option(p, SECTION, "pretrain.train.steps=500 --set pretrain.encoder=resnet18 "
                                  "(pretrain.steps also means pretrain.train.steps)")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="continue a stopped run exactly where it stopped")
    add_progress_option(p)
    add_track_option(p)
    add_label_options(p)


def exit_code(status: str) -> int:
    """0 for a finished run, 143 for one stopped by SIGTERM (it saved a checkpoint and can be resumed), 1 otherwise."""
    return {"succeeded": EXIT_OK, "cancelled": EXIT_SIGTERM}.get(status, EXIT_FAILED)


def run(args) -> int:
    import sys

    from ctssl_core.cli import label_args
    from ctssl_core.config import ConfigError, section_overrides
    from ctssl_core.pretrain import run_pretrain

    labels = label_args(args)  # a bad tag stops here, before a run row exists
    if not args.task and not args.resume:
        from ctssl_core.pretext import PRETEXT

        raise ConfigError(f"give --task (one of {sorted(PRETEXT)}) or --resume RUN_ID")
    overrides = section_overrides(args.overrides, "pretrain", SECTION)
    if args.track:  # before training: a typo or a missing extra fails now
        from ctssl_core.trackers import check_targets

        check_targets(args.track)

    def echo(msg: str) -> None:
        m = _RUN_LINE.match(msg)
        if m and not getattr(args, "run_id", None):
            args.run_id = m.group(1)  # for the Ctrl-C hint
        print(msg, flush=True)

    res = run_pretrain(args.task, store_root=args.store, profile=args.profile, config_path=args.config,
                       overrides=overrides, resume_run_id=args.resume, progress=not args.no_progress, echo=echo,
                       labels=labels)
    from ctssl_core.distributed import env_world

    if env_world()[0] == 0:  # under torchrun only rank 0 prints the run id
        print(res.run_id)
        if res.status == "cancelled":
            print(f"ctssl pretrain: stopped by SIGTERM at step {res.steps}; {resume_hint(res.run_id)}", file=sys.stderr)
        elif args.track:
            from ctssl_core.trackers import mirror_many

            mirror_many(args.store, [res.run_id], args.track)
    return exit_code(res.status)


def resume_hint(run_id: str) -> str:
    """A re-run of `ctssl pretrain --task ...` starts a new run; only --resume continues this one."""
    return f"resume with `ctssl pretrain --resume {run_id}`"


def interrupted_hint(args, exc) -> str:
    run_id = getattr(exc, "run_id", None) or getattr(args, "run_id", None) or args.resume
    if not run_id:  # stopped before a run was recorded: nothing to resume
        return "no run had started; re-run the same command to start it."
    return resume_hint(run_id) + " (a re-run of the same command would start a new run)."
