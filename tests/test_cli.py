"""The `mipnerf360` dispatcher: every command resolves to a module function."""

import importlib
import subprocess
import sys

import pytest

from mipnerf360 import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_an_entry_point(name):
    module, func, _ = cli.COMMANDS[name]
    assert callable(getattr(importlib.import_module(module), func))


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "mipnerf360", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: mipnerf360" in out.stdout
