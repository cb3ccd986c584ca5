"""mipnerf360.runs: run identity, the run-folder lock, checkpoint fallback, moving aside."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mipnerf360 import configs, runs
from mipnerf360.errors import UserError


def test_identity_ignores_settings_that_do_not_change_the_weights():
    base = configs.get_config("cpu")
    same = configs.get_config(
        "cpu",
        overrides=[
            "eval.chunk_size=7",
            "eval.lpips=false",
            "train.log_every=3",
            "train.checkpoint_every=9",
            "train.time_limit_s=60",
            "train.compile=on",
            "data.render_path_frames=5",
        ],
    )
    a, b = runs.make_identity(base, "data1"), runs.make_identity(same, "data1")
    assert a["id"] == b["id"] and runs.identity_diff(a, b) == []
    other = runs.make_identity(configs.get_config("cpu", overrides=["train.batch_size=8"]), "data1")
    assert other["id"] != a["id"]
    assert runs.identity_diff(a, other) == ["train.batch_size: 512 -> 8"]
    moved = runs.make_identity(base, "data2")
    assert runs.identity_diff(a, moved) == ["scene data changed"]
    assert "older version" in runs.identity_diff(None, a)[0]


def test_lock_refuses_a_second_holder_naming_pid_and_host(tmp_path):
    with runs.run_lock(tmp_path, "train"):
        holder = json.loads((tmp_path / runs.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        # Another process (flock locks are per open file, so test across processes).
        code = (
            "import sys; from mipnerf360 import runs\n"
            "try:\n    runs.run_lock(sys.argv[1]).__enter__()\n"
            "except Exception as e:\n    print(e); sys.exit(7)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
        )
        assert out.returncode == 7
        assert f"in use by PID {os.getpid()} on host {socket.gethostname()}" in out.stdout
    # Released: a new holder gets it (also after the holder died: the kernel drops flocks).
    with runs.run_lock(tmp_path, "render"):
        pass


def test_newest_readable_checkpoint_with_fallback(tmp_path, capsys):
    d = tmp_path / "checkpoints"
    assert runs.load_newest_checkpoint(d) is None
    d.mkdir()
    for step in (2, 4):
        torch.save({"step": step, "model": {}}, d / f"ckpt_{step}.pt")
    (d / "ckpt_6.pt").write_bytes(b"PK\x03\x04 truncated")
    state, path = runs.load_newest_checkpoint(d)
    assert state["step"] == 4 and path.endswith("ckpt_4.pt")
    err = capsys.readouterr().err
    assert "ckpt_6.pt: not a readable checkpoint" in err and "ckpt_4.pt instead" in err
    for step in (2, 4):
        (d / f"ckpt_{step}.pt").write_text("garbage")
    with pytest.raises(UserError, match="no readable checkpoint"):
        runs.load_newest_checkpoint(d)


def test_move_aside_keeps_everything(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt_1.pt").write_bytes(b"x")
    (tmp_path / "model.pt").write_bytes(b"weights")
    (tmp_path / "notes.txt").write_text("mine")
    dest = runs.move_aside(tmp_path, "abc")
    assert os.path.dirname(dest) == str(tmp_path / runs.PREVIOUS_DIR) and dest.endswith("-abc")
    assert open(os.path.join(dest, "model.pt"), "rb").read() == b"weights"
    assert os.path.exists(os.path.join(dest, "checkpoints", "ckpt_1.pt"))
    assert not runs.has_run(tmp_path) and (tmp_path / "notes.txt").exists()
    assert runs.move_aside(tmp_path, "abc") is None  # nothing left to move
    (tmp_path / "model.pt").write_bytes(b"again")
    assert runs.move_aside(tmp_path, "abc") != dest  # same second, same label: a new folder


def test_load_trained_rejects_bare_state_dicts_and_corrupt_files(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="bare state_dict"):
        runs.load_trained(str(tmp_path))
    (tmp_path / "model.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="model.pt: not a readable checkpoint"):
        runs.load_trained(str(tmp_path))
    with pytest.raises(UserError, match="has not finished"):
        runs.load_trained(str(tmp_path / "nothing"))
