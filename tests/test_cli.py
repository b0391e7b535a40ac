"""The ``dyshuffle`` dispatcher."""

from __future__ import annotations

import sys
import types
import warnings

import pytest

from dyshuffle import cli


def test_unknown_command_names_it_and_the_valid_ones(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "'trian'" in err and all(name in err for name in cli.COMMANDS)


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_warnings_of_a_command_read_as_its_own_lines(monkeypatch, capsys):
    """A warning raised by a subcommand is printed as ``dyshuffle NAME: warning: ...`` (no
    source file and line), and Python's format is back once the command returns."""
    fake = types.ModuleType("dyshuffle_fake_command")

    def main(argv):
        warnings.warn(f"old checkpoint {argv[0]}", UserWarning, stacklevel=2)
        return 3

    fake.main = main
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(cli.COMMANDS, "fake", (fake.__name__, "a test command"))
    before = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # print as Python does outside pytest (which records warnings instead)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        )
        assert cli.main(["fake", "x.pt"]) == 3
    err = capsys.readouterr().err
    assert err == "dyshuffle fake: warning: old checkpoint x.pt\n"
    assert warnings.formatwarning is before


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag, capsys):
    from dyshuffle import __version__

    assert cli.main([flag]) == 0
    assert capsys.readouterr().out.strip() == __version__
