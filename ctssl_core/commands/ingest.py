"""`ctssl ingest DIR`: DICOM folder -> slice store + catalog.

``--list-errors`` maps the catalog's keyed path hashes back to the files under DIR, on this terminal
only (the store never holds a path); ``--json`` prints that listing (or, alone, the ingest summary) as
one JSON document on stdout for scripts, the human lines going to stderr."""

from __future__ import annotations

from ctssl_core.cli import add_progress_option, add_set_option

SECTION = "ingest"  # the profile section this command reads (`--set KEY=...` means ingest.KEY)
HELP = "Ingest a folder of CT DICOM (any layout) into the slice store and its DuckDB catalog."


def add_arguments(p) -> None:
    p.add_argument("dir", help="folder with DICOM files (searched recursively; sidecars train.csv, "
                               "lidc_xml/, demographics.csv are picked up automatically)")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")
    p.add_argument("--format", default="auto", choices=["auto", "generic", "rsna-pe", "lidc"],
                   help="dataset layout; auto detects sidecars")
    p.add_argument("--demographics", default=None, help="CSV keyed by PatientID or StudyInstanceUID "
                                                          "(age, sex, race, any extra attribute columns); its values "
                                                          "win over DICOM tags. Identifier-like columns (name, birth "
                                                          "date, MRN, ...) are dropped with a warning")
    p.add_argument("--size", type=int, default=None,
                   help="stored in-plane size in pixels (default: the store's size, 256 for a new store); "
                        "a store has one size, so another one is refused")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default 2)")
    p.add_argument("--agreement", type=float, default=None, help="LIDC consensus agreement fraction (default 0.5)")
    add_set_option(p, SECTION, "ingest.workers=4")
    add_progress_option(p)
    p.add_argument("--list-errors", action="store_true",
                   help="print the path and reason of every file under DIR that was not ingested (paths are shown "
                        "here only; the catalog stores keyed hashes of them)")
    p.add_argument("--json", action="store_true",
                   help="stdout is one JSON document: with --list-errors an array of {path (relative to DIR), "
                        "reason, detail, what_to_do}, else the ingest summary; the summary table goes to stderr")


def run(args) -> int:
    import warnings

    from ctssl_core.config import build, section_overrides
    from ctssl_core.data.adapters.demographics import IdentifierColumnsDropped
    from ctssl_core.data.ingest import IngestConfig, ingest, store_size
    from ctssl_core.paths import default_store

    store = args.store or default_store()
    size = args.size
    if size is None:
        size = store_size(store)  # adding to an existing store: its size, not the default
    raw = {"format": args.format, "demographics": args.demographics, "size": size,
           "workers": args.workers, "agreement": args.agreement}
    cfg = build(IngestConfig, {k: v for k, v in raw.items() if v is not None},
                section_overrides(args.overrides, "ingest", SECTION), where="ingest.")
    with warnings.catch_warnings():  # the summary table names dropped columns; no warning traceback line
        warnings.simplefilter("ignore", IdentifierColumnsDropped)
        summary = ingest(args.dir, store, cfg, progress=not args.no_progress)
    if args.json:
        import dataclasses
        import json
        import sys

        print(f"store: {store}\n{summary.table()}", file=sys.stderr)
        doc = error_records(args.dir, store) if args.list_errors else {"store": str(store),
                                                                       **dataclasses.asdict(summary)}
        print(json.dumps(doc, indent=2))
        return 0
    print(f"store: {store}")
    print(summary.table())
    if args.list_errors:
        for rel, reason in list_errors(args.dir, store):
            print(f"{reason:<22} {rel}")
    return 0


def interrupted_hint(args, exc) -> str:
    return "re-run the same command to resume: files already in the store are skipped."


def list_errors(root, store) -> list[tuple[str, str]]:
    """(relative path, reason) of the files under ``root`` recorded in ``ingest_errors``, by reason then path."""
    return [(e["path"], e["reason"]) for e in error_records(root, store)]


def error_records(root, store) -> list[dict[str, str]]:
    """``{path, reason, detail, what_to_do}`` of each file under ``root`` recorded in ``ingest_errors``, by
    reason then path: ``path`` relative to ``root``, found by hashing each file's path with the store's key
    (the catalog holds only the hash); ``detail`` is the catalog's sentence, ``what_to_do`` the reason's
    advice from the summary table."""
    from pathlib import Path

    from ctssl_core.data.catalog import ingest_error_reasons
    from ctssl_core.data.ingest import REASONS, find_files, path_key
    from ctssl_core.data.pseudonym import Pseudonymiser
    from ctssl_core.paths import store_paths

    paths = store_paths(store)
    key = Pseudonymiser.for_store(paths.secret)
    reason_of = ingest_error_reasons(store)
    root = Path(root).resolve()
    out = []
    for f in find_files(root):
        rel = Path(f).relative_to(root).as_posix()
        k = path_key(key, rel)
        if k in reason_of:
            reason, detail = reason_of[k]
            out.append({"path": rel, "reason": reason, "detail": detail, "what_to_do": REASONS.get(reason, "")})
    return sorted(out, key=lambda e: (e["reason"], e["path"]))
