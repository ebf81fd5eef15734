"""README true (issue 17 item 5): every `ctssl ...` command the README shows parses with the real argparse of
ctssl_core/cli.py (without running it), and the cheap ones (`--help`, `--version`) run.

Commands come from inline code spans (`` `ctssl ...` ``) and from fenced code blocks (``ctssl ...`` and
``-m ctssl_core.cli ...`` lines, backslash continuations joined). A synopsis is expanded: each ``a\\|b``
alternative and each ``[optional]`` part is parsed in turn, ``...`` stands for a value. A span that only names
a command (`` `ctssl bias` `` in prose, `` `ctssl jobs cancel` ``) must name one that exists.
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import ctssl_core
from ctssl_core.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands(text: str = README) -> list[str]:
    """Every ctssl command line of the README, as written (argv after `ctssl`, one string each)."""
    found: list[str] = []
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0]
            m = re.search(r"\s-m ctssl_core\.cli(\s.*)?$", line) or re.match(r"^\s*ctssl(\s.*)?$", line)
            if m:
                found.append((m.group(1) or "").strip())
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    found += [m.strip() for m in re.findall(r"`ctssl((?:\s[^`]*)?)`", prose)]
    return found


def variants(cmd: str) -> list[list[str]]:
    """argv lists a synopsis stands for: each ``a\\|b`` alternative, ``[...]`` parts in, ``...`` a value."""
    cmd = cmd.replace("RUN_ID...", "RUN_ID").replace(" ...", " VALUE")
    cmd = re.sub(r"\[([^\]]*?--[^\]]*)\]", r"\1", cmd)    # optional option groups: parse them too
    tokens = shlex.split(cmd.replace("\\|", "\x00"))
    choices = [t.split("\x00") for t in tokens]
    return [list(v) for v in itertools.product(*choices)]


def _subparsers(parser):
    return next((a.choices for a in parser._actions if a.dest in ("command", "action") and a.choices), None)


def names_a_command(argv: list[str]) -> bool:
    """argv is only command (and action) names, e.g. ``bias`` or ``jobs cancel``, each of which exists."""
    parser = build_parser()
    for tok in argv:
        sub = _subparsers(parser)
        if not sub or tok not in sub:
            return False
        parser = sub[tok]
    return bool(argv)


PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")   # RUN_ID, DIR, F, VALUE ...


def fill_placeholders(argv: list[str]) -> list[str]:
    """A placeholder given to a numeric option (``--fraction F``) becomes ``1``: it stands for a number."""
    parser, out = build_parser(), []
    for i, tok in enumerate(argv):
        sub = _subparsers(parser)
        if sub and tok in sub:
            parser = sub[tok]
        action = parser._option_string_actions.get(argv[i - 1]) if i else None
        numeric = action is not None and action.type in (int, float)
        out.append("1" if numeric and PLACEHOLDER.match(tok) else tok)
    return out


def _parses(argv: list[str]) -> str | None:
    """None when argparse accepts argv (placeholders filled), else its error text."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(fill_placeholders(argv))
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if e.code else None
    return None


def test_the_readme_shows_commands_of_every_kind():
    cmds = readme_commands()
    assert len(cmds) >= 30
    firsts = {shlex.split(c.replace("\\|", " "))[0] for c in cmds if c and not c.startswith("-")}
    assert set(COMMANDS) <= firsts, f"commands the README never shows: {sorted(set(COMMANDS) - firsts)}"
    assert "pretrain --task masked_region --profile paper --store /shared/ctssl-store" in cmds   # the torchrun block


def test_every_readme_command_parses():
    bad = []
    for cmd in readme_commands():
        for argv in variants(cmd):
            if argv in (["--help"], ["--version"]):
                continue   # they exit; run below
            if names_a_command(argv):
                continue
            why = _parses(argv)
            if why:
                bad.append(f"ctssl {' '.join(argv)}  ({cmd!r}): {why}")
    assert not bad, "README commands that do not parse:\n" + "\n".join(bad)


@pytest.mark.parametrize("cmd, why", [
    ("ctssl pretrain --taks rotation", "unrecognized arguments: --taks"),
    ("ctssl benchmrk --profile smoke", "invalid choice: 'benchmrk'"),
    ("ctssl export RUN_ID", "the following arguments are required: --out"),
])
def test_the_check_catches_a_wrong_command(cmd, why):
    (found,) = readme_commands(f"Try `{cmd}` now.")
    (argv,) = variants(found)
    assert not names_a_command(argv) and why in _parses(argv)


def test_synopses_expand_to_each_alternative():
    got = variants("finetune --task pe\\|nodule --init random\\|RUN_ID --fraction F")
    assert len(got) == 4 and ["finetune", "--task", "nodule", "--init", "RUN_ID", "--fraction", "F"] in got
    assert variants("ingest DIR [--format auto\\|lidc] [--demographics CSV]") == [
        ["ingest", "DIR", "--format", "auto", "--demographics", "CSV"],
        ["ingest", "DIR", "--format", "lidc", "--demographics", "CSV"]]
    assert variants("dashboard --store ...") == [["dashboard", "--store", "VALUE"]]
    assert names_a_command(["jobs", "cancel"]) and not names_a_command(["jobs", "cancle"])
    assert fill_placeholders(["finetune", "--task", "PE", "--fraction", "F", "--seed", "N"]) == \
        ["finetune", "--task", "PE", "--fraction", "1", "--seed", "1"]


def test_the_cheap_readme_commands_run():
    cmds = readme_commands()
    assert "--version" in cmds and "--help" in cmds
    run = [sys.executable, "-m", "ctssl_core.cli"]
    v = subprocess.run([*run, "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and v.stdout == f"ctssl {ctssl_core.__version__}\n"
    h = subprocess.run([*run, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and all(name in h.stdout for name in COMMANDS)


def test_each_command_has_help_as_the_readme_says(capsys):
    from ctssl_core.cli import main

    assert "each has `--help`" in README
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert f"usage: ctssl {name}" in capsys.readouterr().out
