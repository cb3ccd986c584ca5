"""`mipnerf360 train` (and the render -> evaluate chain) on tiny generated scenes."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import SMALL, wait_until_training

from mipnerf360 import cli, configs, datasets, evaluate, render_views, runs, synthetic, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scene") / "s360"
    return synthetic.generate(out, kind="360", n_views=10, width=40, height=30, seed=0, factors=())


def _run(scene, out, *extra, preset="cpu"):
    """`mipnerf360 train` as the command line runs it (errors -> one line and an exit code)."""
    args = [str(scene), str(out), "--preset", preset, "--no-progress", *SMALL, *extra]
    return cli.main(["train", *args])


def _params(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # three short runs, ~15 s on a shared 2-core CPU
def test_outputs_and_resume_equals_straight_run(scene_dir, tmp_path, capsys):
    opts = ["train.max_steps=8", "train.checkpoint_every=4", "train.log_every=1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(scene_dir, a, *opts) == 0

    # Outputs of a finished run.
    cfg = configs.get_config("cpu", overrides=SMALL + opts)
    assert configs.load_config(a / "config.yaml") == cfg
    assert sorted(os.listdir(a / "checkpoints")) == ["ckpt_4.pt", "ckpt_8.pt"]
    with open(a / "metrics.csv") as f:
        header = f.readline().strip().split(",")
        assert len(f.readlines()) == 8
    assert {"step", "loss", "psnr", "lr", "rays_per_s", "interlevel", "distortion"} <= set(header)
    assert (a / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((a / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["device"] == "cpu" and summary["preset"] == "cpu"
    assert summary["batch_size"] == 64 and summary["num_params"] > 0
    for key in ("wall_time_s", "steps_per_s", "rays_per_s", "peak_memory_mb", "final_train_psnr"):
        assert summary[key] > 0, key
    saved = torch.load(a / "model.pt", weights_only=False)
    assert saved["step"] == 8 and saved["config"] == configs.to_dict(cfg)
    assert not [p for _, _, fs in os.walk(a) for p in fs if p.startswith(".tmp-")]

    # 8 straight == 4, resume, 4 (bit-exact on CPU): b starts from a's checkpoint at step 4.
    straight = torch.load(a / "checkpoints" / "ckpt_8.pt", weights_only=False)
    (b / "checkpoints").mkdir(parents=True)
    shutil.copy(a / "checkpoints" / "ckpt_4.pt", b / "checkpoints" / "ckpt_4.pt")
    assert _run(scene_dir, b, "--resume", *opts) == 0
    assert "resumed from" in capsys.readouterr().err
    _assert_same_state(_params(a / "model.pt"), _params(b / "model.pt"))
    resumed = torch.load(b / "checkpoints" / "ckpt_8.pt", weights_only=False)
    for sa, sb in zip(
        straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True
    ):
        _assert_same_state(sa, sb)
    rows_a = (a / "metrics.csv").read_text().splitlines()
    rows_b = (b / "metrics.csv").read_text().splitlines()
    loss_col = header.index("loss")
    assert [r.split(",")[loss_col] for r in rows_a] == [r.split(",")[loss_col] for r in rows_b]

    # Interrupted-and-resumed writes the same model.pt bytes as the straight run.
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()

    # --resume on a finished run trains nothing and re-writes the same outputs.
    before = {n: (a / n).read_bytes() for n in ("model.pt", "metrics.csv", "config.yaml")}
    summary_before = json.loads((a / "summary.json").read_text())
    assert _run(scene_dir, a, "--resume", *opts) == 0
    assert "resumed from" in capsys.readouterr().err
    assert {n: (a / n).read_bytes() for n in before} == before
    summary_after = json.loads((a / "summary.json").read_text())
    for key in ("steps", "wall_time_s", "steps_per_s", "rays_per_s", "final_train_psnr"):
        assert summary_after[key] == summary_before[key], key


def test_seeded_runs_are_deterministic(scene_dir, tmp_path):
    opts = ["train.max_steps=2"]
    assert _run(scene_dir, tmp_path / "a", *opts) == 0
    assert _run(scene_dir, tmp_path / "b", *opts) == 0
    assert _run(scene_dir, tmp_path / "c", *opts, "train.seed=7") == 0
    pa, pb, pc = (_params(tmp_path / n / "model.pt") for n in "abc")
    _assert_same_state(pa, pb)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


@pytest.mark.slow  # a subprocess that imports torch, ~15 s
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_checkpoint_and_exits_nonzero(scene_dir, tmp_path, signum, code):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mipnerf360", "train", scene_dir, str(out), "--preset", "cpu"]
    cmd += ["--no-progress", *SMALL, "train.max_steps=100000", "train.log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_training(proc, out)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert signal.Signals(signum).name in err
    ckpts = runs.list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1 and ckpts[0][0] >= 1
    assert not (out / "model.pt").exists()
    state = torch.load(ckpts[0][1], weights_only=False)
    assert state["step"] == ckpts[0][0]
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_loss_stops_naming_the_step(scene_dir, tmp_path, capsys):
    # An absurd learning rate blows the parameters up after the first update.
    opts = ["train.max_steps=20", "train.checkpoint_every=1", "train.lr_delay_steps=0"]
    opts += ["train.lr_init=1.0e+30", "train.lr_final=1.0e+30", "train.grad_max_norm=0"]
    code = _run(scene_dir, tmp_path / "run", *opts)
    err = capsys.readouterr().err
    assert code == train.EXIT_NAN, err
    ckpts = runs.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert ckpts, "the last good checkpoint must stay"
    bad_step = ckpts[-1][0] + 1
    assert f"at step {bad_step}" in err
    assert not (tmp_path / "run" / "model.pt").exists()


def test_unknown_config_key_is_exit_2(scene_dir, tmp_path, capsys):
    assert _run(scene_dir, tmp_path / "run", "train.max_stepz=3") == 2
    err = capsys.readouterr().err
    assert "max_stepz" in err
    assert _run(scene_dir, tmp_path / "run", "train.max_steps=many") == 2
    assert _run(scene_dir, tmp_path / "run", "train.log_every=0") == 2
    assert "train.log_every must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_scene_dir_names_the_folder(tmp_path, capsys):
    assert _run(str(tmp_path / "nowhere"), tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and len(err.strip().splitlines()) == 1


def test_manifest_split_and_time_limit(scene_dir, tmp_path, capsys):
    cfg = configs.get_config("cpu")
    scene = datasets.load_scene(scene_dir, cfg.data)
    split = {
        "train": [scene.names[i] for i in scene.i_train],
        "test": [scene.names[i] for i in scene.i_test],
    }
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"split": split}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"split": {"train": split["train"][1:], "test": split["test"]}}))
    assert _run(scene_dir, tmp_path / "x", "--manifest", str(bad), "train.max_steps=1") == 1
    assert "bad.json: the train split" in capsys.readouterr().err

    # Matching manifest; a 1 s time limit ends a 100000-step run early but cleanly.
    out = tmp_path / "run"
    opts = ["train.max_steps=100000", "train.time_limit_s=1.0", "train.checkpoint_every=1"]
    assert _run(scene_dir, out, "--manifest", str(good), *opts) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "time_limit"
    assert 1 <= summary["steps"] < 100000
    assert summary["wall_time_s"] >= 1.0
    assert (out / "model.pt").exists()
    steps = summary["steps"]
    last_row = (out / "metrics.csv").read_text().splitlines()[-1]
    assert int(last_row.split(",")[0]) == steps  # the stopping step is logged
    assert (out / "curves.png").exists()
    kept = [s for s, _ in runs.list_checkpoints(out / "checkpoints")]
    assert kept == ([steps - 1, steps] if steps > 1 else [1])  # only the last 2 are kept


@pytest.mark.slow
def test_end_to_end_beats_mean_colour(tmp_path):
    """Train a few hundred steps, render the test views, evaluate (with LPIPS-alex)."""
    scene = synthetic.generate(
        tmp_path / "scene", kind="360", n_views=16, width=48, height=36, seed=3, factors=()
    )
    run = tmp_path / "run"
    opts = ["train.max_steps=600", "train.batch_size=256", "train.lr_delay_steps=20"]
    opts += ["train.lr_init=0.01", "train.lr_final=0.001", "model.num_prop_samples=16"]
    opts += ["model.num_nerf_samples=16", "model.prop_mlp.net_width=32"]
    opts += ["model.nerf_mlp.net_depth=3", "model.nerf_mlp.net_width=64"]
    opts += ["model.nerf_mlp.bottleneck_width=32", "model.nerf_mlp.net_width_viewdirs=32"]
    opts += ["model.prop_mlp.max_deg_point=6", "model.nerf_mlp.max_deg_point=8"]
    assert _run(scene, run, *opts) == 0  # (the later overrides win over SMALL's)
    renders, metrics_dir = tmp_path / "renders", tmp_path / "metrics"
    assert render_views.main([str(run), scene, str(renders), "--device", "cpu"]) == 0
    assert evaluate.main([str(renders), str(metrics_dir), "--lpips-nets", "alex"]) == 0
    m = json.loads((metrics_dir / "metrics.json").read_text())

    cfg = configs.load_config(run / "config.yaml")
    sc = datasets.load_scene(scene, cfg.data)
    assert m["num_images"] == len(sc.i_test) > 0
    mean_colour = sc.images[sc.i_train].reshape(-1, 3).mean(0)
    baseline = np.mean(
        [-10 * np.log10(np.mean((sc.images[i] - mean_colour) ** 2)) for i in sc.i_test]
    )
    # Measured: 24.4 dB against a 17.8 dB baseline (600 steps, ~50 s on one core).
    assert m["psnr"] > baseline + 4, (m["psnr"], baseline)
    assert 0 < m["lpips_alex"] < 1 and m["ssim"] > 0
    # Render folder contents.
    name = m["images"][0]["name"]
    depth = np.load(renders / "depth" / f"{name}.npy")
    assert depth.shape == (36, 48) and np.all(np.isfinite(depth)) and depth.min() > 0
    for sub in ("color", "gt", "depth", "acc"):
        assert (renders / sub / f"{name}.png").exists()


# ----------------------------------------------------------------------------- run state
# Issue 9: each test below failed before run identities, the run lock and idempotent
# finishing existed.


def _fast(*extra):
    return ["train.checkpoint_every=2", "train.log_every=1", *extra]


def test_resume_of_finished_run_re_emits_deleted_outputs(scene_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(scene_dir, out, *_fast("train.max_steps=6")) == 0
    summary = json.loads((out / "summary.json").read_text())
    weights = (out / "model.pt").read_bytes()
    for name in ("model.pt", "metrics.csv", "summary.json", "curves.png", "config.yaml"):
        (out / name).unlink()
    assert _run(scene_dir, out, "--resume", *_fast("train.max_steps=6")) == 0
    assert "at step 6" in capsys.readouterr().err
    assert (out / "model.pt").read_bytes() == weights
    again = json.loads((out / "summary.json").read_text())
    assert again["steps_per_s"] > 0 and again["rays_per_s"] > 0
    assert again["final_train_psnr"] == summary["final_train_psnr"] is not None
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 6
    assert (out / "curves.png").exists() and (out / "config.yaml").exists()


def test_resume_refuses_a_run_of_other_data_and_restarts_on_request(tmp_path, capsys):
    def scene(seed):
        return synthetic.generate(
            tmp_path / f"scene{seed}",
            kind="360",
            n_views=6,
            width=24,
            height=18,
            seed=seed,
            factors=(),
        )

    out = tmp_path / "run"
    opts = _fast("train.max_steps=2")
    scene0, scene1 = scene(0), scene(1)
    assert _run(scene0, out, *opts) == 0
    old = (out / "model.pt").read_bytes()
    capsys.readouterr()
    # Same settings, other data (a generated scene's seed): not the same run.
    assert _run(scene1, out, "--resume", *opts) == 2
    err = capsys.readouterr().err
    assert "scene data changed" in err and len(err.strip().splitlines()) == 1
    assert (out / "model.pt").read_bytes() == old  # untouched
    # --restart-on-change: the old run is moved aside, the new one trains from step 0.
    assert _run(scene1, out, "--resume", "--restart-on-change", *opts) == 0
    err = capsys.readouterr().err
    assert "resumed" not in err and "moved to" in err
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[1].startswith("1,")  # first logged step of the new run
    (previous,) = (out / "previous").iterdir()
    assert (previous / "model.pt").read_bytes() == old
    assert (previous / "checkpoints").is_dir()


def test_resume_names_the_settings_that_differ(scene_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(scene_dir, out, *_fast("train.max_steps=2")) == 0
    capsys.readouterr()
    assert _run(scene_dir, out, "--resume", *_fast("train.max_steps=2", "train.batch_size=32")) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 64 -> 32" in err and "Traceback" not in err
    width = "model.nerf_mlp.net_width=48"
    assert _run(scene_dir, out, "--resume", *_fast("train.max_steps=2", width)) == 2
    err = capsys.readouterr().err
    assert "model.nerf_mlp.net_width: 32 -> 48" in err and "size mismatch" not in err
    # Settings outside the identity (eval, cadence, time limit, compile) resume fine.
    other = _fast("train.max_steps=2", "eval.chunk_size=512", "train.compile=off")
    assert _run(scene_dir, out, "--resume", *other, "train.log_every=2") == 0


def test_fresh_run_moves_a_finished_run_aside_and_back_on_failure(
    scene_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    assert _run(scene_dir, out, *_fast("train.max_steps=3")) == 0
    finished = (out / "model.pt").read_bytes()
    # A setting the config rejects: nothing in the folder is touched.
    assert _run(scene_dir, out, "train.data_loss_type=l1") == 2
    assert (out / "model.pt").read_bytes() == finished
    assert not (out / "previous").exists()

    # A run that fails at step 1 (here: a fault injected into the step) puts the old run back.
    from mipnerf360 import train_utils

    def broken(*a, **k):
        def step(*a, **k):
            raise RuntimeError("injected fault at step 1")

        return step

    monkeypatch.setattr(train_utils, "make_train_step", broken)
    with pytest.raises(RuntimeError, match="injected"):
        train.train(scene_dir, str(out), configs.get_config("cpu", overrides=SMALL), progress=False)
    monkeypatch.undo()
    assert (out / "model.pt").read_bytes() == finished
    assert [s for s, _ in runs.list_checkpoints(out / "checkpoints")] == [2, 3]
    assert not any((out / "previous").iterdir())

    # A fresh run that gets going moves the finished one to previous/ (nothing deleted).
    assert _run(scene_dir, out, *_fast("train.max_steps=1")) == 0
    assert torch.load(out / "model.pt", weights_only=False)["step"] == 1
    assert [s for s, _ in runs.list_checkpoints(out / "checkpoints")] == [1]
    (previous,) = (out / "previous").iterdir()
    assert (previous / "model.pt").read_bytes() == finished


def test_corrupt_newest_checkpoint_falls_back_and_leftovers_are_removed(
    scene_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    # A run with checkpoints 2 and 4; then ckpt_4 is truncated and model.pt deleted.
    assert _run(scene_dir, out, *_fast("train.max_steps=4")) == 0
    straight = _params(out / "model.pt")
    ckpt4 = out / "checkpoints" / "ckpt_4.pt"
    ckpt4.write_bytes(ckpt4.read_bytes()[:1000])
    (out / "model.pt").unlink()
    leftover = out / "checkpoints" / ".tmp-abc.pt"
    leftover.write_bytes(b"half a checkpoint")
    assert _run(scene_dir, out, "--resume", *_fast("train.max_steps=4")) == 0
    err = capsys.readouterr().err
    assert "ckpt_4.pt" in err and "ckpt_2.pt instead" in err and "at step 2" in err
    assert not leftover.exists()
    _assert_same_state(straight, _params(out / "model.pt"))  # steps 3-4 retrained


def test_second_process_on_a_run_folder_fails_at_once(scene_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mipnerf360", "train", scene_dir, str(out), "--preset", "cpu"]
    cmd += ["--no-progress", *SMALL, "train.max_steps=100000", "train.log_every=1"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_training(first, out)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        err = second.stderr.strip()
        assert f"in use by PID {first.pid} on host" in err and len(err.splitlines()) == 1
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
        assert first.returncode == 143
    finally:
        if first.poll() is None:
            first.kill()
    # The lock died with its process: a resume takes the folder over (the time limit, not
    # part of the run's identity, is already used up, so it only writes the outputs).
    resume = ["--resume", "train.max_steps=100000", "train.log_every=1", "train.time_limit_s=1e-6"]
    assert _run(scene_dir, out, *resume) == 0
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "time_limit"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "foo"], "--device 'foo'"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--threads", "-1"], "--threads must be >= 1"),
    ],
)
def test_bad_device_and_threads_are_one_line(scene_dir, tmp_path, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = _run(scene_dir, tmp_path / "run", "train.max_steps=1", *args)
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "model.pt").exists()
