import subprocess
import sys

from ctssl_core.cli import COMMANDS, build_parser, main


def test_help_lists_every_built_subcommand_and_each_has_help():
    parser = build_parser()
    out = parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) <= set(COMMANDS)
    assert len(sub.choices) >= 1
    for name, p in sub.choices.items():
        assert name in out
        assert p.format_help().startswith("usage: ctssl " + name)


def test_no_command_prints_help_and_fails():
    assert main([]) == 2


def test_console_script_answers_help():
    r = subprocess.run([sys.executable, "-m", "ctssl_core.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage: ctssl" in r.stdout


def test_version_prints_the_package_version(capsys):
    import pytest

    from ctssl_core import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ctssl {__version__}"
