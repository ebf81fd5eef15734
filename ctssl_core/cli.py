"""The ``ctssl`` command. Each subcommand lives in ``ctssl_core/commands/<name>.py``.

A command module exposes ``HELP: str``, ``add_arguments(parser)`` and
``run(args) -> int``. Modules import their heavy dependencies (torch, duckdb,
pydicom) inside ``run`` so that ``ctssl --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ctssl_core import __version__

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
}


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
    from ctssl_core.config import ConfigError
    from ctssl_core.db import StoreError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except (ConfigError, StoreError, FileNotFoundError) as e:
        print(f"ctssl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctssl {args.command}: interrupted; re-run the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
