"""`ctssl bias`: probes, KS tests, separability (and subgroup performance) of one embedding vs random init."""

from __future__ import annotations

from ctssl_core.cli import add_set_option

SECTION = "bias"  # the profile section this command reads (`--set KEY=...` means bias.KEY)

HELP = "bias analysis of an embedding against random init: probes, KS tests, separability, subgroup metrics"


def add_arguments(p) -> None:
    p.add_argument("--emb", required=True, metavar="EMB_ID", help="embedding id written by `ctssl embed`")
    p.add_argument("--reference", default=None, metavar="EMB_ID",
                   help="reference embedding (default: the newest random-init one of the same split/level/encoder)")
    p.add_argument("--scores", default=None, metavar="PATH",
                   help="parquet/csv of downstream PE scores (patient_key, score, label) for subgroup performance, "
                        "e.g. a PE fine-tune's <store>/runs/RUN_ID/exam_scores.parquet")
    p.add_argument("--val-scores", default=None, metavar="PATH",
                   help="the same model's validation-split scores (same columns): they choose the TPR/FPR threshold "
                        "(default: exam_scores_val.parquet beside --scores when there; else bias.threshold)")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    p.add_argument("--profile", default=None, help="profile whose `bias` section sets defaults (smoke, quick, paper)")
    add_set_option(p, SECTION, "bias.n_boot=200 --set bias.correction=holm --set bias.attributes=[age,sex,bmi] "
                               "(any demographics column; an unknown one is an error)")


def run(args) -> int:
    from pathlib import Path

    import pandas as pd

    from ctssl_core.bias import BiasConfig, analysable_attributes, analyse_encoder, check_attributes
    from ctssl_core.config import ConfigError, build, load_profile, section_overrides
    from ctssl_core.paths import store_paths

    base = dict(load_profile(args.profile).get("bias") or {}) if args.profile else {}
    overrides = section_overrides(args.overrides, "bias", SECTION)
    cfg = build(BiasConfig, base, overrides, where="bias.")
    if "attributes" in base or any(o.split("=", 1)[0].strip() == "attributes" for o in overrides):
        # named by the user: each must exist (the default list may name control_group, which only synthetic data has)
        check_attributes(cfg.attributes, analysable_attributes(store_paths(args.store).root))
    from ctssl_core.finetune import EXAM_SCORES, VAL_EXAM_SCORES

    def table(flag: str, path: Path):
        if not path.exists():
            raise ConfigError(f"{flag} {path} does not exist; pass a parquet or csv with patient_key, score, label")
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)

    scores = val_scores = None
    if args.val_scores and not args.scores:
        raise ConfigError("--val-scores only chooses the threshold for --scores: pass --scores as well")
    if args.scores:
        scores = table("--scores", Path(args.scores))
        val_path = Path(args.val_scores) if args.val_scores else None
        beside = Path(args.scores).with_name(VAL_EXAM_SCORES)
        if val_path is None and Path(args.scores).name == EXAM_SCORES and beside.is_file():
            val_path = beside
            print(f"validation scores: {beside} (beside --scores) choose the TPR/FPR threshold")
        val_scores = table("--val-scores", val_path) if val_path is not None else None
    df = analyse_encoder(store_paths(args.store).root, args.emb, args.reference, cfg, pe_scores=scores, progress=print,
                         pe_val_scores=val_scores)
    ks = df[df["analysis"] == "ks"]
    for s in df.loc[df["analysis"] != "ks", "sentence"]:
        print(s)
    if len(ks):
        print(f"KS tests: {int(ks['flagged'].sum())} of {len(ks)} flagged after {cfg.correction} correction "
              f"({', '.join(sorted(set(ks.loc[ks['flagged'].astype(bool), 'attribute']))) or 'none'}).")
    print(f"{len(df)} rows written to bias_results for {args.emb}.")
    return 0
