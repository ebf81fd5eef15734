"""`ctssl annotate RUN_ID --name N --tag KEY=VALUE --note TEXT`: a run's name, tags and notes in the store.

The same flags set them at run start in `ctssl pretrain|finetune|benchmark` (``cli.add_label_options``)."""

from __future__ import annotations

from ctssl_core.cli import add_label_options

HELP = "name a run, tag it (KEY=VALUE) and add notes; trackers (--track, ctssl track) carry them along"


def add_arguments(p) -> None:
    p.add_argument("run_id", metavar="RUN_ID", help="the run to annotate")
    add_label_options(p, at_start=False)
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")


def run(args) -> int:
    import json

    from ctssl_core.cli import label_args
    from ctssl_core.config import ConfigError
    from ctssl_core.results.write import annotate_run

    labels = label_args(args)
    if labels is None:
        raise ConfigError("nothing to change: give --name, --tag KEY=VALUE or --note")
    got = annotate_run(args.store, args.run_id, **labels)
    print(f"{args.run_id}: name {got['name']!r}, tags {json.dumps(got['tags'], sort_keys=True)}, "
          f"notes {'set' if got['notes'] else 'none'}")
    return 0
