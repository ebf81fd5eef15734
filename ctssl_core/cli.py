"""The ``ctssl`` command. Each subcommand lives in ``ctssl_core/commands/<name>.py``.

A command module exposes ``HELP: str``, ``add_arguments(parser)`` and
``run(args) -> int``, and optionally ``interrupted_hint(args, exc) -> str`` (what
to do after Ctrl-C: resume how, or start again). Modules import their heavy
dependencies (torch, duckdb, pydicom) inside ``run`` so that ``ctssl --help``
answers instantly. Options every command spells the same way come from the
``add_*_option`` helpers here.

Exit codes (README "Exit codes"): 0 done; 1 the command ran but its run failed;
2 bad usage, config or store (the message says what to do); 130 interrupted by
Ctrl-C (SIGINT); 143 stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ctssl_core import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + signal number, as a shell reports a process ended by it
DEFAULT_INTERRUPTED_HINT = "nothing of this command is resumable; re-run it to start again."

# registry: subcommand -> module under ctssl_core.commands
COMMANDS: dict[str, str] = {
    "synth": "synth",
    "ingest": "ingest",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "export": "export",
    "benchmark": "benchmark",
    "embed": "embed",
    "bias": "bias",
    "jobs": "jobs",
    "worker": "worker",
    "dashboard": "dashboard",
    "track": "track",
    "annotate": "annotate",
}


def add_set_option(p: argparse.ArgumentParser, section: str, example: str) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable), the one override grammar of every command.

    The command turns the values into config with ``config.profile_overrides`` or
    ``config.section_overrides`` (which check the section and give the short form
    ``KEY=VALUE`` its meaning: ``section.KEY``).
    """
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override a profile key by its full path, e.g. --set {example} (repeatable); "
                        f"a key without a section means {section}.KEY")


def add_progress_option(p: argparse.ArgumentParser) -> None:
    """``--no-progress`` (alias ``--quiet``, its older name in some commands): no progress bars, log lines only."""
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="no progress bars, log lines only (--quiet is the same flag)")


def add_json_option(p: argparse.ArgumentParser) -> None:
    """``--json``: a listing command prints one JSON document (for scripts) instead of its table."""
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def add_track_option(p: argparse.ArgumentParser, flag: str = "--track", required: bool = False) -> None:
    """``--track mlflow:URI|tensorboard:DIR|wandb:DIR`` (repeatable): mirror the finished run(s) to a tracker
    (``trackers.py``; off by default). ``ctssl track`` spells it ``--to``, with the same values."""
    p.add_argument(flag, dest="track", action="append", default=[], required=required,
                   metavar="mlflow:URI|tensorboard:DIR|wandb:DIR",
                   help="mirror the finished run(s) to MLflow (a tracking URI, or a folder for a local file store), "
                        "TensorBoard (a log dir) or W&B (offline runs in a local folder, for `wandb sync`); "
                        "repeatable; needs `pip install ctssl[trackers]`")


def add_label_options(p: argparse.ArgumentParser, at_start: bool = True) -> None:
    """``--name NAME``, ``--tag KEY=VALUE`` (repeatable), ``--note TEXT`` (alias ``--notes``): a run's
    labels, the same flags in ``ctssl annotate`` (after the fact) and in pretrain/finetune/benchmark
    (at run start, so the dashboard shows them while the run trains). ``label_args`` checks them."""
    when = "the run(s) this command starts" if at_start else "the run"
    p.add_argument("--name", default=None, help=f"a short name shown beside the id of {when} ('' clears it)")
    p.add_argument("--tag", dest="tags", action="append", default=[], metavar="KEY=VALUE",
                   help=f"tag {when} (repeatable; KEY= removes a tag)")
    p.add_argument("--note", "--notes", dest="note", default=None, metavar="TEXT",
                   help=f"free text about {when} ('' clears it); no patient data")


def label_args(args: argparse.Namespace) -> dict | None:
    """The checked labels of ``add_label_options`` (``results.write.check_labels``: one validation for
    annotate and run start), or None when none was given. Raises ConfigError (exit 2) on a bad tag."""
    from ctssl_core.results.write import check_labels

    labels = check_labels(args.name, args.tags, args.note)
    return labels if (args.name is not None or args.note is not None or args.tags) else None


def build_parser(available: dict[str, object] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctssl",
        description="Self-supervised pretraining benchmark and bias analysis for chest CT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in (available or _load_all()).items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _load_all() -> dict[str, object]:
    mods = {}
    for name, modname in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(f"ctssl_core.commands.{modname}")
        except ModuleNotFoundError as e:
            if e.name == f"ctssl_core.commands.{modname}":
                continue  # command not built yet
            raise
    return mods


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return EXIT_USAGE
    from ctssl_core.results import runfolder

    runfolder.STARTED.clear()       # only the runs this command starts are its to merge
    try:
        return _run(args)
    finally:
        merge_own_runs(args.command)


def merge_own_runs(command: str) -> None:
    """Hand the runs this command started to the store, once its work has returned (or failed): training
    code writes only run folders (``results/runfolder.py``), and a command run by hand has no driver to
    merge them. Under a job the job's runner merges them (and this process leaves the store alone)."""
    import os

    from ctssl_core.results import runfolder as rf

    if not rf.STARTED or os.environ.get(rf.JOB_DIR_ENV):
        return
    from ctssl_core.results.write import merge_pending

    for store, run_id in dict.fromkeys(rf.STARTED):
        try:
            merge_pending(store, run_id)
        except Exception as e:  # noqa: BLE001 - the command's own outcome stands; the folder keeps the run
            print(f"ctssl {command}: run {run_id} is in its folder but the store could not take it now "
                  f"({type(e).__name__}: {str(e)[:200]}); the dashboard shows it from the folder, and the next "
                  f"`ctssl benchmark` on this store merges it", file=sys.stderr)
    rf.STARTED.clear()


def _run(args) -> int:
    from ctssl_core.config import ConfigError
    from ctssl_core.db import StoreError

    try:
        return int(args._module.run(args) or 0)
    except (ConfigError, StoreError, FileNotFoundError) as e:
        print(f"ctssl {args.command}: error: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", ()):      # e.g. the store could not record the run's end either
            print(f"ctssl {args.command}: also: {note}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        # library code that stops on SIGTERM and unwinds with KeyboardInterrupt marks it `e.signal = "SIGTERM"`
        by_term = getattr(e, "signal", None) == "SIGTERM"
        print(f"ctssl {args.command}: {'stopped by SIGTERM' if by_term else 'interrupted'}; "
              f"{interrupted_hint(args, e)}", file=sys.stderr)
        return EXIT_SIGTERM if by_term else EXIT_SIGINT


def interrupted_hint(args: argparse.Namespace, exc: BaseException) -> str:
    """What to do after Ctrl-C: the command's own advice (resume how), or that it starts again."""
    hint = getattr(args._module, "interrupted_hint", None)
    return hint(args, exc) if hint else DEFAULT_INTERRUPTED_HINT


if __name__ == "__main__":
    sys.exit(main())
