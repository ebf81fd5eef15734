"""`ctssl finetune`: one downstream fine-tuning (task x init x label fraction x seed), scored with CIs."""

from __future__ import annotations

from ctssl_core.cli import add_label_options, add_progress_option, add_set_option, add_track_option

SECTION = "downstream"  # `--set KEY=...` means downstream.KEY
# what `ctssl finetune` reads of a profile: the downstream section, the pretraining's architecture and the split scheme
READS = ("downstream", "pretrain.encoder", "pretrain.encoder_params", "benchmark.split_seed", "benchmark.pool",
         "benchmark.split_fractions")

HELP = "Fine-tune a downstream task (pe, nodule, demographics) from random init or a pretraining, and score it."


def add_arguments(p) -> None:
    p.add_argument("--task", required=True, choices=["pe", "nodule", "demographics"], help="downstream task")
    p.add_argument("--init", default="random",
                   help="random | a pretext key (latest finished pretraining of it) | a run id | a checkpoint path")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of training patients (nested by seed)")
    p.add_argument("--seed", type=int, default=0, help="training seed and patient-subset seed")
    p.add_argument("--profile", default="quick", help="profile whose `downstream` and `pretrain.encoder` to use")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    add_set_option(p, SECTION, "downstream.train.steps=50")
    add_progress_option(p)
    add_track_option(p)
    add_label_options(p)


def run(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from ctssl_core.plan import finetune_config, pretrain_encoder, resolve_profile
    from ctssl_core.cli import label_args
    from ctssl_core.config import profile_overrides
    from ctssl_core.finetune import finetune
    from ctssl_core.paths import default_store

    labels = label_args(args)  # a bad tag stops here, before a run row exists
    cfg = resolve_profile(args.profile, profile_overrides(args.overrides, "finetune", SECTION, reads=READS))
    bench = cfg.get("benchmark") or {}
    split_seed, pool = int(bench.get("split_seed", 0)), float(bench.get("pool", 0.0))
    fractions = tuple(bench.get("split_fractions", (0.7, 0.15, 0.15)))
    fc = finetune_config(cfg, args.task, args.init, args.fraction, args.seed, split_seed, pretrain_encoder(cfg),
                         pool, fractions)
    store = Path(args.store) if args.store else default_store()
    if args.track:  # before training: a typo or a missing extra fails now
        from ctssl_core.trackers import check_targets

        check_targets(args.track)
    steps = int(fc.train.get("steps", 200))
    with tqdm(total=steps, disable=args.no_progress, desc=f"finetune {args.task} {args.init}", unit="step") as bar:
        res = finetune(fc, store, profile=str(cfg.get("profile")), progress=lambda s: bar.update(s - bar.n),
                       labels=labels)
    print(f"run {res.run_id}: {args.task} from {res.init}, {res.n_train_patients} training patients, "
          f"{res.n_train_slices} slices, {res.wall_s:.1f}s")
    for m, ci in res.metrics.items():
        print(f"  {m:16s} {ci.value:.4f}  [{ci.low:.4f}, {ci.high:.4f}]")
    if args.track:
        from ctssl_core.trackers import mirror_many

        mirror_many(store, [res.run_id], args.track)
    return 0


def interrupted_hint(args, exc) -> str:
    return "a fine-tuning has no resume; re-run the same command to train it again from the start."
