"""`ctssl annotate RUN_ID --name N --tag KEY=VALUE --note TEXT`: a run's name, tags and notes in the store."""

from __future__ import annotations

HELP = "name a run, tag it (KEY=VALUE) and add notes; trackers (--track, ctssl track) carry them along"


def add_arguments(p) -> None:
    p.add_argument("run_id", metavar="RUN_ID", help="the run to annotate")
    p.add_argument("--name", default=None, help="a short name shown beside the run id ('' clears it)")
    p.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE",
                   help="add or change a tag (repeatable; KEY= removes it)")
    p.add_argument("--note", default=None, help="free text about the run ('' clears it); no patient data")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")


def run(args) -> int:
    import json

    from ctssl_core.config import ConfigError
    from ctssl_core.results.write import annotate_run

    tags = {}
    for item in args.tags:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--tag {item!r} must look like KEY=VALUE (e.g. --tag owner=ana; KEY= removes it)")
        tags[key.strip()] = value
    if args.name is None and args.note is None and not tags:
        raise ConfigError("nothing to change: give --name, --tag KEY=VALUE or --note")
    got = annotate_run(args.store, args.run_id, name=args.name, tags=tags, notes=args.note)
    print(f"{args.run_id}: name {got['name']!r}, tags {json.dumps(got['tags'], sort_keys=True)}, "
          f"notes {'set' if got['notes'] else 'none'}")
    return 0
