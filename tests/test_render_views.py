"""`mipnerf360 render`: test views of a trained model, its settings and its errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import train_small

from mipnerf360 import configs, datasets, evaluate, render_views
from mipnerf360.errors import ConfigError, UserError
from mipnerf360.runs import run_lock

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step model of a 40x32 procedural 360 scene: (scene_dir, run_dir)."""
    return train_small(
        tmp_path_factory.mktemp("render"), "train.batch_size=32", "eval.chunk_size=500"
    )


def test_render_writes_every_view(trained, tmp_path):
    """File layout, shapes and the ground truth of every test view."""
    scene, run = trained
    out = tmp_path / "renders"
    assert render_views.main([run, scene, str(out), "--device", "cpu"]) == 0
    info = json.loads((out / "renders.json").read_text())
    sc = datasets.load_scene(scene, configs.load_config(os.path.join(run, "config.yaml")).data)
    assert info["names"] == [os.path.splitext(sc.names[i])[0] for i in sc.i_test]
    assert info["step"] == 2 and len(info["seconds_per_image"]) == len(sc.i_test)
    assert info["float_color"] is False
    for name, i in zip(info["names"], sc.i_test, strict=True):
        np.testing.assert_array_equal(np.load(out / "gt" / f"{name}.npy"), sc.images[i])
        assert evaluate.read_png(str(out / "color" / f"{name}.png")).shape == (32, 40, 3)
        assert not (out / "color" / f"{name}.npy").exists()
        depth = np.load(out / "depth" / f"{name}.npy")
        assert depth.shape == (32, 40) and np.isfinite(depth).all() and (depth > 0).all()
        assert evaluate.read_png(str(out / "depth" / f"{name}.png")).shape == (32, 40, 3)
        assert evaluate.read_png(str(out / "acc" / f"{name}.png")).shape == (32, 40, 3)


def test_eval_overrides_and_stale_views(trained, tmp_path):
    """eval.* settings apply to the render; a re-render leaves only its own views."""
    scene, run = trained
    out = tmp_path / "renders"
    assert render_views.main([run, scene, str(out), "eval.max_test_images=2"]) == 0
    assert len(json.loads((out / "renders.json").read_text())["names"]) == 2
    args = [run, scene, str(out), "eval.max_test_images=1", "eval.quantize_metrics=false"]
    assert render_views.main(args) == 0
    info = json.loads((out / "renders.json").read_text())
    assert len(info["names"]) == 1 and info["float_color"] is True
    for sub in render_views.SUBDIRS:
        stems = {os.path.splitext(f)[0] for f in os.listdir(out / sub)}
        assert stems == set(info["names"]), sub
    assert (out / "color" / f"{info['names'][0]}.npy").exists()


@pytest.mark.parametrize(
    "override, key",
    [("train.max_steps=5", "train.max_steps"), ("model.nerf_mlp.net_width=8", "model.nerf_mlp")],
)
def test_non_eval_override_is_a_config_error(trained, tmp_path, override, key):
    scene, run = trained
    with pytest.raises(ConfigError, match=key):
        render_views.main([run, scene, str(tmp_path / "r"), override])
    assert not (tmp_path / "r").exists()  # nothing created before the settings are checked


def test_second_render_of_one_folder_fails_naming_the_holder(trained, tmp_path):
    scene, run = trained
    out = tmp_path / "renders"
    with run_lock(out, "render"), pytest.raises(UserError) as ei:
        render_views.main([run, scene, str(out)])
    msg = str(ei.value)
    assert f"PID {os.getpid()}" in msg and "host" in msg and str(out) in msg
    assert not (out / "renders.json").exists()


def _copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_truncated_model_is_one_error(trained, tmp_path):
    scene, run = trained
    bad = _copy_run(run, tmp_path)
    data = (bad / "model.pt").read_bytes()
    (bad / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.pt"):
        render_views.main([str(bad), scene, str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_bare_state_dict_is_one_error(trained, tmp_path):
    scene, run = trained
    bad = _copy_run(run, tmp_path)
    saved = torch.load(bad / "model.pt", weights_only=False)
    torch.save(saved["model"], bad / "model.pt")
    with pytest.raises(UserError, match="state_dict"):
        render_views.main([str(bad), scene, str(tmp_path / "r")])


def test_output_that_cannot_be_a_folder_names_the_path(trained, tmp_path):
    """As root, chmod does not stop writes: use a file where the folder should be, and a
    path under /proc, which nobody can create folders in."""
    scene, run = trained
    blocker = tmp_path / "out"
    blocker.write_text("a file")
    with pytest.raises(UserError, match=str(blocker)):
        render_views.main([run, scene, str(blocker)])
    with pytest.raises(UserError, match="/proc/mipnerf360-renders"):
        render_views.main([run, scene, "/proc/mipnerf360-renders"])


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--threads", "-1"], "--threads -1"),
        (["--threads", "0"], "--threads 0"),
        (["--device", "foo"], "--device 'foo'"),
        (["--device", "tpu"], "--device 'tpu'"),
    ],
)
def test_bad_options_are_config_errors(trained, tmp_path, extra, match):
    scene, run = trained
    with pytest.raises(ConfigError, match=match):
        render_views.main([run, scene, str(tmp_path / "r"), *extra])
    assert not (tmp_path / "r").exists()  # nothing created before the options are checked


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_one_error(trained, tmp_path):
    scene, run = trained
    with pytest.raises(UserError, match="CUDA is not available"):
        render_views.main([run, scene, str(tmp_path / "r"), "--device", "cuda"])


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "MIPNERF360_DEBUG"}
    r = subprocess.run(
        [sys.executable, "-m", "mipnerf360.cli", *args], capture_output=True, text=True, env=env
    )
    return r.returncode, r.stderr.strip().splitlines()


@pytest.mark.parametrize("case", ["truncated", "state_dict", "threads", "device", "override"])
def test_cli_error_is_one_line(trained, tmp_path, case):
    scene, run = trained
    out = str(tmp_path / "r")
    args = [run, scene, out]
    if case in ("truncated", "state_dict"):
        bad = _copy_run(run, tmp_path)
        if case == "truncated":
            (bad / "model.pt").write_bytes((bad / "model.pt").read_bytes()[:1000])
        else:
            saved = torch.load(bad / "model.pt", weights_only=False)
            torch.save(saved["model"], bad / "model.pt")
        args = [str(bad), scene, out]
    extra = {"threads": ["--threads", "-1"], "device": ["--device", "foo"]}.get(case, [])
    if case == "override":
        extra = ["data.factor=2"]
    code, lines = _cli("render", *args, *extra)
    assert len(lines) == 1, lines
    assert lines[0].startswith("mipnerf360 render: error: ")
    assert code == (1 if case in ("truncated", "state_dict") else 2)


def test_colorize_depth_orders_near_and_far():
    depth = np.tile(np.linspace(1.0, 10.0, 16, dtype=np.float32), (4, 1))
    rgb = render_views.colorize_depth(depth)
    assert rgb.shape == (4, 16, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert not np.allclose(rgb[:, 0], rgb[:, -1])  # near and far differ
    # No accumulation -> white background.
    np.testing.assert_allclose(render_views.colorize_depth(depth, np.zeros_like(depth)), 1.0)
