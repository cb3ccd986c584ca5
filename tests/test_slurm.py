"""The benchmark on a real (local, single-node) SLURM cluster.

Tests marked ``slurm`` need the cluster of ``.ci/slurm/start.sh``. The session fixture
``slurm_cluster`` uses a cluster that is already up (CI starts one) or starts one itself and
then stops it again, by the PIDs in its pid files (``.ci/slurm/stop.sh``). Starting needs
root (Debian packages are installed when missing).

Every Snakemake run happens in a private copy under ``tmp_path``; nothing is written into the
repository.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import alive

REPO = Path(__file__).resolve().parents[1]
CI = REPO / ".ci" / "slurm"
PROFILE = REPO / "workflow" / "profiles" / "slurm"
BASE = Path(os.environ.get("MIPNERF_SLURM_BASE", "/tmp/mipnerf360-slurm"))

# the profile's 20 s first status check is too slow for tests
FAST = ["--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5"]


def slurm_env() -> dict[str, str]:
    env = dict(os.environ)
    env["SLURM_CONF"] = str(BASE / "etc" / "slurm.conf")
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    return env


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", slurm_env())
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def cluster_up() -> bool:
    if not (BASE / "etc" / "slurm.conf").exists():
        return False
    try:
        ping = sh(["scontrol", "ping"], timeout=20)
        info = sh(["sinfo", "-h", "-o", "%T"], timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    state = info.stdout.strip()
    return "UP" in ping.stdout and state in ("idle", "mixed", "allocated", "completing")


DAEMONS = ("run/slurmd.pid", "run/slurmctld.pid", "munge/run.pid")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A usable local SLURM cluster; stopped afterwards (by PID) if this fixture started it."""
    if cluster_up():
        yield BASE
        return
    res = sh(["bash", str(CI / "start.sh")], timeout=600)
    pids = [int((BASE / f).read_text()) for f in DAEMONS if (BASE / f).exists()]
    try:
        assert res.returncode == 0, f"start.sh failed:\n{res.stdout}\n{res.stderr}"
        assert cluster_up(), "the SLURM cluster is not usable after start.sh"
        yield BASE
    finally:
        stop = sh(["bash", str(CI / "stop.sh")], timeout=300)
        assert stop.returncode == 0, stop.stderr
        assert not [p for p in pids if alive(p)], "stop.sh left SLURM daemons running"


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run snakemake in ``workdir`` with the repository's SLURM profile."""
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(PROFILE), *FAST, *args]
    return sh(cmd, cwd=workdir, timeout=timeout)


def submitted_jobs(log: str) -> dict[str, list[str]]:
    """rule name -> SLURM job ids, parsed from the plugin's submit lines in a snakemake log."""
    jobs: dict[str, list[str]] = {}
    pat = r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_([^/]+)/"
    for jid, rule in re.findall(pat, log):
        jobs.setdefault(rule, []).append(jid)
    return jobs


def show_job(jobid: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (finished jobs stay visible for MinJobAge=600 s)."""
    res = sh(["scontrol", "show", "job", "-d", "-o", jobid])
    assert res.returncode == 0, res.stderr
    fields = {}
    for tok in res.stdout.split():
        key, _, value = tok.partition("=")
        fields[key] = value
    return fields


# --------------------------------------------------------------------------------- profile


def test_profile_is_a_slurm_profile():
    prof = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert prof["executor"] == "slurm"
    res = prof["default-resources"]
    for key in ("slurm_partition", "slurm_account", "runtime", "mem_mb"):
        assert key in res, key
    assert int(prof["retries"]) >= 1  # a preempted / timed-out training job is resubmitted
    assert prof["slurm-status-command"] in ("squeue", "sacct")


def test_profile_readme_exists():
    text = (PROFILE / "README.md").read_text()
    assert "Running on a SLURM cluster" in text
    assert "--profile workflow/profiles/slurm" in text


# --------------------------------------------------------------------------------- cluster


TOY = """
localrules: all

rule all:
    input: "r/cpu.txt", "r/gpu.txt"

rule cpu:
    output: "r/cpu.txt"
    resources: mem_mb=300, runtime=5
    shell: "echo ${{SLURM_JOB_ID:-none}} > {output}"

rule gpu:
    output: "r/gpu.txt"
    resources: mem_mb=300, runtime=5, gpu=1
    shell:
        "echo ${{SLURM_JOB_ID:-none}} ${{CUDA_VISIBLE_DEVICES:-unset}} > {output}"

rule gpu2:
    output: "r/gpu2.txt"
    resources: mem_mb=300, runtime=5, gpu=2
    shell: "touch {output}"
"""


@pytest.mark.slurm
def test_cluster_start_is_idempotent(slurm_cluster):
    pidfiles = [slurm_cluster / "run" / f for f in ("slurmctld.pid", "slurmd.pid")]
    before = [p.read_text().strip() for p in pidfiles]
    res = sh(["bash", str(CI / "start.sh")])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == f"export SLURM_CONF={BASE}/etc/slurm.conf"
    assert [p.read_text().strip() for p in pidfiles] == before  # nothing restarted


@pytest.mark.slurm
def test_jobs_run_under_slurm_and_gpu_job_gets_a_gpu(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(TOY)
    res = snakemake(tmp_path, "--retries", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    log = res.stdout + res.stderr
    jobs = submitted_jobs(log)
    assert sorted(jobs) == ["cpu", "gpu"], log  # `all` is local, the others went to SLURM

    cpu_id = (tmp_path / "r" / "cpu.txt").read_text().split()
    assert cpu_id == jobs["cpu"]  # the rule ran inside that SLURM job
    gpu_id, cuda = (tmp_path / "r" / "gpu.txt").read_text().split()
    assert gpu_id == jobs["gpu"][0]
    assert cuda == "0"  # the node's one GPU, index 0

    gpu_job, cpu_job = show_job(gpu_id), show_job(cpu_id[0])
    assert gpu_job["JobState"] == "COMPLETED" and cpu_job["JobState"] == "COMPLETED"
    assert gpu_job.get("TresPerJob") == "gres:gpu:1" and gpu_job.get("JOB_GRES") == "gpu:1"
    assert "gpu" not in cpu_job.get("TresPerJob", "") + cpu_job.get("JOB_GRES", "")


@pytest.mark.slurm
def test_two_gpus_on_a_one_gpu_cluster_fail_clearly(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(TOY)
    res = snakemake(tmp_path, "--retries", "0", "r/gpu2.txt", timeout=120)
    log = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Error in rule gpu2" in log
    assert "Requested node configuration is not available" in log
    assert "--gpus=2" in log
    assert not (tmp_path / "r" / "gpu2.txt").exists()


# --------------------------------------------------------------------------------- benchmark

# Tiny benchmark: one procedural 360 scene, a tiny model and few steps, training on one
# (fake) GPU of the local test cluster but on the CPU.
TINY = {
    "device": "cpu",
    "metrics": {"lpips": False},
    "resources": {
        "default": {"threads": 1, "mem_mb": 1000, "runtime": 10},
        "train": {"threads": 1, "mem_mb": 2000, "runtime": 10, "gpu": 1},
        "render": {"threads": 1, "mem_mb": 2000, "runtime": 10, "gpu": 0},
        "evaluate": {"threads": 1, "mem_mb": 2000, "runtime": 10, "gpu": 0},
    },
    "seeds": [0],
    "datasets": {
        "synthetic_360": {
            "source": {"generate": "360", "views": 10, "width": 32, "height": 24, "seed": 0},
            "preset": "tiny",
            "steps": 40,
            "overrides": {
                "data.factor": 1,
                "train.batch_size": 256,
                "train.checkpoint_every": 10,
                "train.log_every": 10,
                "eval.chunk_size": 2048,
            },
            "scenes": {"procedural": {}},
        }
    },
}
DATASET, SCENE = "synthetic_360", "procedural"
TRAIN_DIR = Path("results/train") / DATASET / SCENE / "baseline" / "seed0"
LOG = Path("logs/train") / DATASET / SCENE / "baseline" / "seed0.log"
# columns of results/tables/*.csv that measure the machine, not the result
TIMING = {"train_time_min", "rays_per_s", "peak_memory_mb"}


def workflow_copy(dst: Path) -> Path:
    """A private copy of the workflow (Snakefile, rules, configs) with the tiny config."""
    for name in ("workflow", "config", "envs"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dst / name)
    (dst / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    return dst


def outcome(workdir: Path) -> dict:
    """The deterministic results of a benchmark run: tables, metrics, training summary."""
    out = {}
    for csv in sorted((workdir / "results" / "tables").glob("*.csv")):
        df = pd.read_csv(csv)
        if csv.name == "runs.csv":
            df = df[~df["metric"].isin(TIMING)]
        else:
            df = df[[c for c in df.columns if c.split(":")[-1] not in TIMING]]
        out[csv.name] = df.to_dict("list")
    ev = workdir / "results" / "evaluate" / DATASET / SCENE / "baseline" / "seed0" / "metrics.json"
    metrics = json.loads(ev.read_text())
    out["metrics"] = {k: metrics[k] for k in ("psnr", "ssim", "num_images")}
    out["images"] = [(i["name"], i["psnr"], i["ssim"]) for i in metrics["images"]]
    summary = json.loads((workdir / TRAIN_DIR / "summary.json").read_text())
    out["summary"] = {k: summary[k] for k in ("steps", "final_loss", "final_train_psnr")}
    return out


def assert_same(a, b, path="", tol=1e-6):
    """Equal structures; floats within tol (NaN == NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{path}: {a} != {b}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}", tol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]", tol)
    elif isinstance(a, float) or isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), f"{path}: {a} != {b}"
        else:
            assert abs(a - b) <= tol, f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The tiny benchmark with Snakemake's local executor: the reference results."""
    wd = workflow_copy(tmp_path_factory.mktemp("local"))
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "tiny.yaml"]
    res = sh(cmd, cwd=wd, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    assert not submitted_jobs(log)
    return outcome(wd)


@pytest.mark.slurm
def test_benchmark_through_slurm_matches_local_run(slurm_cluster, local_run, tmp_path):
    wd = workflow_copy(tmp_path)
    res = snakemake(wd, "--configfile", "tiny.yaml")
    log = res.stdout + res.stderr
    assert res.returncode == 0, log

    # every heavy step ran as its own SLURM job, on this workflow copy, and completed
    jobs = submitted_jobs(log)
    assert sorted(jobs) == ["evaluate", "render", "train"], log
    for rule, ids in jobs.items():
        assert len(ids) == 1, (rule, ids)
        job = show_job(ids[0])
        assert job["JobState"] == "COMPLETED", (rule, job)
        assert job["Comment"].startswith(f"rule_{rule}"), job["Comment"]
        assert Path(job["WorkDir"]).resolve() == wd.resolve()
    # the training job asked for the GPU and got it
    train_job = show_job(jobs["train"][0])
    assert train_job.get("TresPerJob") == "gres:gpu:1", train_job  # asked for
    assert train_job.get("JOB_GRES") == "gpu:1", train_job  # allocated
    # light rules stayed on the submit host
    for rule in ("generate", "prepare", "tables"):
        assert f"localrule {rule}:" in log, rule

    assert_same(outcome(wd), local_run)


@pytest.mark.slurm
def test_training_killed_with_sigterm_resumes_to_the_same_result(
    slurm_cluster, local_run, tmp_path
):
    wd = workflow_copy(tmp_path)
    logfile = wd / "snakemake.log"
    cmd = [
        sys.executable, "-m", "snakemake", "--profile", str(PROFILE), *FAST,
        "--configfile", "tiny.yaml",
    ]  # fmt: skip
    with open(logfile, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=wd, env=slurm_env(), stdout=fh, stderr=subprocess.STDOUT)
    try:
        # wait for the training job to run and write its first checkpoint
        ckpts = wd / TRAIN_DIR / "checkpoints"
        deadline = time.monotonic() + 240
        first = None
        while time.monotonic() < deadline and proc.poll() is None:
            first = first or submitted_jobs(logfile.read_text()).get("train", [None])[0]
            if first and ckpts.is_dir() and any(ckpts.glob("ckpt_*.pt")):
                break
            time.sleep(0.2)
        assert first and any(ckpts.glob("ckpt_*.pt")), logfile.read_text()
        assert not (wd / TRAIN_DIR / "model.pt").exists()
        # what SLURM does at a time limit or preemption: SIGTERM to the job's processes
        kill = sh(["scancel", "--signal=TERM", first])
        assert kill.returncode == 0, kill.stderr
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:  # stop snakemake (it cancels its SLURM jobs) by PID
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    log = logfile.read_text()
    assert rc == 0, log

    ids = submitted_jobs(log)["train"]
    assert len(ids) == 2 and ids[0] == first, ids  # killed once, resubmitted once
    assert show_job(ids[0])["JobState"] == "FAILED"
    assert show_job(ids[1])["JobState"] == "COMPLETED"
    train_log = (wd / LOG).read_text()
    m = re.search(r"resumed from \S+ at step (\d+)", train_log)
    assert m, train_log[-2000:]
    assert 0 < int(m.group(1)) < local_run["summary"]["steps"]

    assert_same(outcome(wd), local_run)


@pytest.mark.slurm
def test_two_process_training_job_matches_the_single_process_run(
    slurm_cluster, local_run, tmp_path
):
    """One SLURM training job with 2 data-parallel processes (gloo on the CPU: the test
    cluster's GPU is fake) gives the tables of the 1-process local run. Not bit-equal: the
    two processes' gradient means are averaged, a different float32 summation order than one
    process's mean (tests/test_distributed.py), ~1e-7 relative in the weights after 40 steps."""
    wd = workflow_copy(tmp_path)
    cfg = copy.deepcopy(TINY)
    cfg["resources"]["train"]["processes"] = 2
    (wd / "tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = snakemake(wd, "--configfile", "tiny.yaml")
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    jobs = submitted_jobs(log)
    assert len(jobs["train"]) == 1 and show_job(jobs["train"][0])["JobState"] == "COMPLETED"
    assert "--nproc-per-node 2" in log
    summary = json.loads((wd / TRAIN_DIR / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert_same(outcome(wd), local_run, tol=1e-4)
