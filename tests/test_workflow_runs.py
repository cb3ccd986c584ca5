"""Training state under real Snakemake runs: reruns and interruptions never lose a finished
model, never loop on MissingOutputException, and never mix two runs.

Each scenario drives ``python -m snakemake`` on a private copy of the workflow with one tiny
procedural 360 scene (issue 9, items 1 and 3):

- ``--forcerun train`` of a finished run: the package re-emits the same model.pt bytes;
- ``device: cpu`` changed to ``auto``: nothing reruns;
- SIGINT to the snakemake process only, while training: the rerun finishes the job;
- ``kill -9`` of snakemake while training, ``--unlock``, rerun: the same;
- SIGTERM to the training process (what SLURM sends): the rerun resumes from the
  checkpoint to the same weights as an uninterrupted run;
- the generated scene's ``seed`` changed: training starts over at step 0 and the old run
  is kept in previous/.

Signals go to processes these tests started (snakemake) or to that snakemake's own
children, by PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import CPU_RESOURCES, alive

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
RUN = "synthetic_360/scene/baseline/seed0"
TRAIN = Path("results/train") / RUN
LOG = Path("logs/train") / f"{RUN}.log"
STEPS = 120

CONFIG = {
    "device": "cpu",
    "metrics": {"lpips": False},
    "resources": CPU_RESOURCES,
    "seeds": [0],
    "overrides": {
        "data.factor": 1,
        "train.batch_size": 128,
        "train.checkpoint_every": 10,
        "train.log_every": 10,
        # torch.compile ('auto' compiles on CPU too) makes two identical runs differ by
        # ~1e-7: off, so "the same weights" below is bit-exact
        "train.compile": "off",
        "eval.chunk_size": 1024,
        "eval.max_test_images": 1,
    },
    "datasets": {
        "synthetic_360": {
            "source": {"generate": "360", "views": 8, "width": 32, "height": 24, "seed": 0},
            "preset": "tiny",
            "steps": STEPS,
            "scenes": {"scene": {}},
        }
    },
}

pytestmark = pytest.mark.slow


def workflow_copy(dst: Path, cfg: dict = CONFIG) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("workflow", "config", "envs"):
        shutil.copytree(REPO / name, dst / name)
    (dst / "c.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def snakemake(wd: Path, *args: str, timeout: int = 300) -> tuple[int, str]:
    res = subprocess.run(
        [*SNAKEMAKE, "--cores", "2", "--configfile", "c.yaml", *args],
        cwd=wd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return res.returncode, res.stdout + res.stderr


def start(wd: Path) -> tuple[subprocess.Popen, Path]:
    """snakemake in the background (its own session, so no signal reaches it by accident)."""
    out = wd / "snakemake.out"
    with open(out, "w") as fh:
        proc = subprocess.Popen(
            [*SNAKEMAKE, "--cores", "2", "--configfile", "c.yaml"],
            cwd=wd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, out


def children(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid`` (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def is_train_process(pid: int) -> bool:
    """The `mipnerf360 train` Python process itself (not the shell that started it)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    names = [os.path.basename(a.decode()) for a in argv[:2]]
    return "mipnerf360" in names and b"train" in argv[:4]


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def training(wd: Path, proc: subprocess.Popen) -> list[int]:
    """Wait until the train job has written a checkpoint (and is not finished); the PIDs of
    snakemake's descendants then, and the one of the training process."""
    ckpts = wd / TRAIN / "checkpoints"
    wait_for(
        lambda: ckpts.is_dir() and any(ckpts.glob("ckpt_*.pt")),
        240,
        "the first checkpoint",
        proc,
    )
    assert not (wd / TRAIN / "model.pt").exists(), "training finished too fast to interrupt"
    kids = children(proc.pid)
    assert any(" train " in cmdline(p) for p in kids), [cmdline(p) for p in kids]
    return kids


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_no_missing_output_loop(log: str) -> None:
    assert "MissingOutputException" not in log, log[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: its folder, model.pt bytes and weights."""
    wd = workflow_copy(tmp_path_factory.mktemp("reference"))
    rc, log = snakemake(wd)
    assert rc == 0, log[-5000:]
    model = wd / TRAIN / "model.pt"
    return {"wd": wd, "bytes": model.read_bytes(), "weights": weights(model)}


def test_forcerun_train_re_emits_the_finished_run(reference):
    wd = reference["wd"]
    before = {n: (wd / TRAIN / n).read_bytes() for n in ("metrics.csv", "config.yaml")}
    rc, log = snakemake(wd, "--forcerun", "train")
    assert rc == 0, log[-5000:]
    assert_no_missing_output_loop(log)
    train_log = (wd / LOG).read_text()
    assert re.search(rf"resumed from \S+ at step {STEPS}\b", train_log), train_log[-2000:]
    assert (wd / TRAIN / "model.pt").read_bytes() == reference["bytes"]
    for name, data in before.items():
        assert (wd / TRAIN / name).read_bytes() == data, name
    summary = json.loads((wd / TRAIN / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["rays_per_s"] > 0 and summary["final_train_psnr"] is not None
    rc, log = snakemake(wd, "-n")
    assert rc == 0 and "Nothing to be done" in log, log[-3000:]


def test_device_change_reruns_nothing(reference):
    wd = reference["wd"]
    cfg = json.loads(json.dumps(CONFIG))
    cfg["device"] = "auto"
    (wd / "c.yaml").write_text(yaml.safe_dump(cfg))
    try:
        mtime = (wd / TRAIN / "model.pt").stat().st_mtime_ns
        rc, log = snakemake(wd)
        assert rc == 0, log[-5000:]
        assert "Nothing to be done" in log
        assert (wd / TRAIN / "model.pt").stat().st_mtime_ns == mtime
    finally:
        (wd / "c.yaml").write_text(yaml.safe_dump(CONFIG))


def test_sigint_to_snakemake_while_training(reference, tmp_path):
    wd = workflow_copy(tmp_path)
    proc, out = start(wd)
    try:
        kids = training(wd, proc)
        os.kill(proc.pid, signal.SIGINT)  # snakemake only, not its process group
        proc.wait(timeout=120)
        # whatever snakemake did with its job, let any training it left finish
        wait_for(lambda: not any(alive(p) for p in kids), 240, "the left training")
    finally:
        stop(proc)
    first = out.read_text()
    rc, log = snakemake(wd)
    assert rc == 0, first[-3000:] + log[-5000:]
    assert_no_missing_output_loop(log)
    assert same_weights(weights(wd / TRAIN / "model.pt"), reference["weights"])
    assert "resumed from" in (wd / LOG).read_text()
    rc, log = snakemake(wd, "-n")
    assert rc == 0 and "Nothing to be done" in log, log[-3000:]


def test_kill_9_of_snakemake_then_unlock_and_rerun(reference, tmp_path):
    wd = workflow_copy(tmp_path)
    proc, _ = start(wd)
    try:
        kids = training(wd, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        wait_for(lambda: not any(alive(p) for p in kids), 240, "the orphaned training")
    finally:
        stop(proc)
    # the orphaned training finished on its own
    assert (wd / TRAIN / "model.pt").exists()
    rc, log = snakemake(wd)
    assert rc != 0 and "unlock" in log.lower(), log[-3000:]  # snakemake's own lock
    rc, log = snakemake(wd, "--unlock")
    assert rc == 0, log[-3000:]
    rc, log = snakemake(wd)
    assert rc == 0, log[-5000:]
    assert_no_missing_output_loop(log)
    assert same_weights(weights(wd / TRAIN / "model.pt"), reference["weights"])
    assert re.search(rf"resumed from \S+ at step {STEPS}\b", (wd / LOG).read_text())


def test_sigterm_to_training_resumes_to_the_same_weights(reference, tmp_path):
    wd = workflow_copy(tmp_path)
    proc, out = start(wd)
    try:
        kids = training(wd, proc)
        (train,) = [p for p in kids if is_train_process(p)]
        os.kill(train, signal.SIGTERM)  # what SLURM sends at a time limit or preemption
        rc = proc.wait(timeout=120)
    finally:
        stop(proc)
    assert rc != 0, out.read_text()[-3000:]
    assert not (wd / TRAIN / "model.pt").exists()
    rc, log = snakemake(wd)
    assert rc == 0, log[-5000:]
    assert_no_missing_output_loop(log)
    m = re.search(r"resumed from \S+ at step (\d+)", (wd / LOG).read_text())
    assert m and 0 < int(m.group(1)) < STEPS
    assert same_weights(weights(wd / TRAIN / "model.pt"), reference["weights"])
    # one log across the interruption: every logged step once, in order (plus the row of
    # the step the signal stopped at)
    steps = pd.read_csv(wd / TRAIN / "metrics.csv")["step"].tolist()
    assert steps == sorted(set(steps)) and set(range(10, STEPS + 1, 10)) <= set(steps)


def test_generated_scene_seed_change_trains_from_step_0(reference, tmp_path):
    wd = workflow_copy(tmp_path)
    shutil.copytree(reference["wd"] / "results", wd / "results")
    shutil.copytree(reference["wd"] / ".snakemake", wd / ".snakemake", symlinks=True)
    rc, log = snakemake(wd, "-n")
    assert rc == 0 and "Nothing to be done" in log, log[-3000:]
    cfg = json.loads(json.dumps(CONFIG))
    cfg["datasets"]["synthetic_360"]["source"]["seed"] = 5
    (wd / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc, log = snakemake(wd)
    assert rc == 0, log[-5000:]
    train_log = (wd / LOG).read_text()
    assert "settings or data changed (scene data changed)" in train_log, train_log[-2000:]
    assert "resumed from" not in train_log
    metrics = pd.read_csv(wd / TRAIN / "metrics.csv")
    assert metrics["step"].min() == 10  # from step 0, not resumed
    (prev,) = list((wd / TRAIN / "previous").iterdir())
    last = max((prev / "checkpoints").glob("ckpt_*.pt"), key=lambda p: int(p.stem[5:]))
    old = torch.load(last, map_location="cpu", weights_only=False)
    assert old["step"] == STEPS and same_weights(old["model"], reference["weights"])
    assert not same_weights(weights(wd / TRAIN / "model.pt"), reference["weights"])
