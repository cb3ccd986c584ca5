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


def test_bad_input_is_a_one_line_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MIPNERF360_DEBUG", raising=False)
    missing = tmp_path / "no_such_scene"
    code = cli.main(["prepare", str(missing), str(tmp_path / "m.json"), "--dataset-type", "colmap"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("mipnerf360 prepare: error:") and str(missing) in err
    assert "Traceback" not in err
