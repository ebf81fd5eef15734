"""`ctssl embed`: slice + exam embeddings of the evaluation split, and their PCA/UMAP projections."""

from __future__ import annotations

from ctssl_core.cli import add_progress_option, add_set_option

SECTION = "embed"  # the profile section this command reads (`--set KEY=...` means embed.KEY)
HELP = "embed the evaluation split with a checkpoint (or random init) and store PCA/UMAP projections"


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN_ID|PATH|random",
                   help="a run id in the store, a checkpoint file/run folder, or 'random' (random init of --encoder)")
    p.add_argument("--split", default=None, help="evaluation split: train | val | test (default) | all")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    p.add_argument("--encoder", default=None, help="encoder key for --checkpoint random (default resnet18)")
    p.add_argument("--profile", default=None, help="profile whose `embed` section sets defaults (smoke, quick, paper)")
    p.add_argument("--no-umap", action="store_true", help="skip UMAP (PCA only); UMAP's first fit compiles numba (~30-45 s)")
    add_set_option(p, SECTION, "embed.batch_size=128 --set embed.max_per_series=16")
    add_progress_option(p)


def run(args) -> int:
    from ctssl_core.config import build, load_profile, section_overrides
    from ctssl_core.embed import EmbedConfig, run_embed
    from ctssl_core.paths import store_paths

    base = dict(load_profile(args.profile).get("embed", {})) if args.profile else {}
    if args.split:
        base["split"] = args.split
    if args.encoder:
        base["encoder"] = args.encoder
    if args.no_umap:
        base["umap"] = False
    cfg = build(EmbedConfig, base, section_overrides(args.overrides, "embed", SECTION), where="embed.")
    root = store_paths(args.store).root
    ids = run_embed(root, args.checkpoint, cfg, log=print, progress=not args.no_progress)
    for level, emb_id in ids.items():
        print(f"{level} embeddings: {emb_id}")
    print(f"next: ctssl bias --emb {ids['exam']} --store {root}")
    return 0


def interrupted_hint(args, exc) -> str:
    return "re-run the same command to embed again (from the first slice)."
