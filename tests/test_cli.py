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


TUNED_PROCESS = """
import contextlib, io, resource, sys, torch
from mipnerf360 import cli
if sys.argv[1] == "command":
    # any command: the settings come before the command's own code
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        cli.main(["tables", "--help"])
torch.set_num_threads(2)
tiny = torch.full((1 << 20,), 1e-30) * 1e-10  # subnormal unless flushed, made by two threads
print(int(torch.count_nonzero(tiny)))
for _ in range(3):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(1 << 24)  # 64 MB
    del block
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(faults)
"""


@pytest.mark.parametrize("mode", ["command", "bare"])
def test_commands_flush_denormals_and_keep_freed_memory(mode):
    # Every command's process flushes subnormals in all of torch's threads and reuses freed
    # large blocks (a 64 MB tensor, once one was freed, costs no page faults: 16,384 without
    # the setting); a bare process keeps subnormals (so the first check can fail).
    out = subprocess.run(
        [sys.executable, "-c", TUNED_PROCESS, mode], capture_output=True, text=True, check=True
    )
    nonzero, faults = (int(v) for v in out.stdout.split())
    if mode == "command":
        assert nonzero == 0 and faults < 1000, out.stdout
    else:
        assert nonzero == 1 << 20, out.stdout


def test_bad_input_is_a_one_line_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MIPNERF360_DEBUG", raising=False)
    missing = tmp_path / "no_such_scene"
    code = cli.main(["prepare", str(missing), str(tmp_path / "m.json"), "--dataset-type", "colmap"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("mipnerf360 prepare: error:") and str(missing) in err
    assert "Traceback" not in err
