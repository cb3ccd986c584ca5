"""mipnerf360.io: atomic writes with the user's umask; OS errors name the path."""

import os
import stat

import numpy as np
import pytest

from mipnerf360 import io
from mipnerf360.errors import UserError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_folders_get_the_umask_not_0600(tmp_path, umask_022):
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.write_yaml(tmp_path / "a.yaml", {"x": 1})
    io.write_csv(tmp_path / "a.csv", [{"x": 1}])
    io.write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.float32))
    io.write_npy(tmp_path / "a.npy", np.zeros(3))
    for name in ("a.json", "a.yaml", "a.csv", "a.png", "a.npy"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    with io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755
    assert not [n for n in os.listdir(tmp_path) if n.startswith(io.TMP_PREFIX)]


def test_atomic_dir_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    with io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "one").write_text("1")
    with pytest.raises(RuntimeError), io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "two").write_text("2")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path / "d") == ["one"]
    assert os.listdir(tmp_path) == ["d"]


def test_write_errors_name_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"{tmp_path}/file/out.json: cannot write"):
        io.write_json(tmp_path / "file" / "out.json", {})
    with pytest.raises(UserError, match="/proc/no/out.json: cannot write"):
        io.write_text("/proc/no/out.json", "x")
    with pytest.raises(UserError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        io.read_json(tmp_path / "bad.json")


def test_disk_full_is_one_error_naming_the_path(tmp_path, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda p, m="r", *a, **k: Full(real_open(p, m, *a, **k)))
    with pytest.raises(UserError, match="out.bin: cannot write: No space left on device"):
        io.write_bytes(tmp_path / "out.bin", b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # no half file, no temporary


def test_remove_temporaries(tmp_path):
    (tmp_path / ".tmp-abc.pt").write_bytes(b"half")
    (tmp_path / ".tmp-dir").mkdir()
    (tmp_path / "keep.pt").write_bytes(b"whole")
    removed = io.remove_temporaries(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == [".tmp-abc.pt", ".tmp-dir"]
    assert os.listdir(tmp_path) == ["keep.pt"]
