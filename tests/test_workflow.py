"""The Snakemake workflow: DAG over the paper configs, lint/format, config validation, an
end-to-end run of a tiny config (tables, report) and rerun-only-what-changed."""

import functools
import hashlib
import http.server
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
STEPS = ("prepare", "train", "render", "evaluate")

PAPER_SCENES = {
    "mipnerf360": {
        "bicycle",
        "flowers",
        "garden",
        "stump",
        "treehill",
        "room",
        "counter",
        "kitchen",
        "bonsai",
    },
    "llff": {"fern", "flower", "fortress", "horns", "leaves", "orchids", "room", "trex"},
    "blender": {"chair", "drums", "ficus", "hotdog", "lego", "materials", "mic", "ship"},
}

# A tiny benchmark: two procedural 360 scenes compared with the paper's numbers (named like
# two of the paper's scenes) and one LLFF scene; tiny model, a few steps, no LPIPS.
TINY = {
    "device": "cpu",
    "metrics": {"lpips": False},
    "resources": {
        "default": {"threads": 1, "mem_mb": 1000, "runtime": 10},
        "train": {"threads": 1, "gpu": 0},
    },
    "overrides": {
        "train.batch_size": 128,
        "train.checkpoint_every": 5,
        "train.log_every": 5,
        "eval.chunk_size": 1024,
    },
    "datasets": {
        "synthetic_360": {
            "dataset_type": "colmap",
            "source": {"generate": "360", "views": 8, "width": 32, "height": 24, "seed": 0},
            "preset": "tiny",
            "steps": 10,
            "published": "360",
            "scenes": {"bonsai": {}, "garden": {"source": {"seed": 1}}},
        },
        "synthetic_llff": {
            "dataset_type": "llff",
            "source": {"generate": "llff", "views": 8, "width": 32, "height": 24, "seed": 2},
            "preset": "tiny",
            "steps": 10,
            "overrides": {
                "data.forward_facing": True,
                "data.near": 0.0,
                "data.far": 1.0,
                "model.raydist_fn": None,
                "model.ray_shape": "cylinder",
                "model.prop_mlp.warp_fn": None,
                "model.nerf_mlp.warp_fn": None,
            },
            "scenes": {"fern": {}},
        },
    },
}


def workflow_copy(dst: Path) -> Path:
    """The workflow, configs and env in a fresh folder (no results of other runs)."""
    for name in ("workflow", "config", "envs"):
        shutil.copytree(REPO / name, dst / name)
    (dst / "tests" / "data").mkdir(parents=True)
    (dst / "tests" / "data" / "bird").symlink_to(REPO / "tests" / "data" / "bird")
    return dst


def run(args, cwd, timeout=300):
    res = subprocess.run(
        [*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    return res, res.stdout + res.stderr


def dry_run_jobs(cwd, *args) -> set[tuple[str, str, str]]:
    """{(rule, dataset, scene)} of the jobs `snakemake -n` would run ('' when no wildcard)."""
    res, log = run(["-n", "--cores", "1", *args], cwd)
    assert res.returncode == 0, log
    jobs, rule, wc = set(), None, {}
    for line in log.splitlines() + ["rule end:"]:
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            if rule is not None:
                jobs.add((rule, wc.get("dataset", wc.get("archive", "")), wc.get("scene", "")))
            rule, wc = m.group(1), {}
        m = re.match(r"^\s+wildcards: (.*)$", line)
        if m and rule is not None:
            wc = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
    return jobs


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- static


def test_paper_dag_has_every_scene_through_every_rule(tmp_path):
    wd = workflow_copy(tmp_path)
    jobs = dry_run_jobs(wd, "--configfile", "config/paper.yaml")
    counts = Counter(rule for rule, _, _ in jobs)
    assert counts == {
        "download": 4,
        "prepare": 25,
        "train": 25,
        "render": 25,
        "evaluate": 25,
        "tables": 1,
        "all": 1,
    }
    for step in STEPS:
        got = {d: {s for r, d2, s in jobs if r == step and d2 == d} for d in PAPER_SCENES}
        assert got == PAPER_SCENES, step
    assert {d for r, d, _ in jobs if r == "download"} == {
        "360_v2",
        "360_extra_scenes",
        "nerf_synthetic",
        "nerf_llff_data",
    }


@pytest.mark.parametrize(
    "name,scenes", [("mipnerf360", 9), ("llff", 8), ("blender", 8), ("config", 4)]
)
def test_each_config_dag(tmp_path, name, scenes):
    wd = workflow_copy(tmp_path)
    jobs = dry_run_jobs(wd, "--configfile", f"config/{name}.yaml")
    for step in STEPS:
        assert sum(r == step for r, _, _ in jobs) == scenes


def test_paper_protocol_settings(tmp_path):
    """Presets, factors and 250k steps of the reference reach the commands; train asks for
    one GPU with the configured threads/memory/runtime."""
    wd = workflow_copy(tmp_path)
    res, log = run(["-n", "-p", "--cores", "1", "--configfile", "config/paper.yaml"], wd)
    assert res.returncode == 0, log
    train_cmds = [line for line in log.splitlines() if "mipnerf360 train " in line]
    assert len(train_cmds) == 25
    cfg = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    for d, ds in cfg["datasets"].items():
        for s in ds["scenes"]:
            (cmd,) = [c for c in train_cmds if f"results/train/{d}/{s} " in c]
            assert f"--preset {ds['preset']}" in cmd
            assert f"data.factor={ds['factor']}" in cmd and "train.max_steps=250000" in cmd
            assert "--resume" in cmd and f"--manifest results/prepare/{d}/{s}/manifest.json" in cmd
    presets = {d: ds["preset"] for d, ds in cfg["datasets"].items()}
    assert presets == {"mipnerf360": "360", "llff": "llff_256", "blender": "blender_256"}
    assert [cfg["datasets"][d]["factor"] for d in presets] == [4, 4, 0]
    train_res = [line for line in log.splitlines() if "resources:" in line and "gpu=1" in line]
    want = cfg["resources"]["train"]
    assert any(
        f"runtime={want['runtime']}" in r and f"mem_mb={want['mem_mb']}" in r for r in train_res
    )


def test_lint_is_clean():
    res, log = run(["--lint"], REPO, timeout=120)
    assert res.returncode == 0, log
    assert "Congratulations, your workflow is in a good condition" in log


def test_rules_are_snakefmt_formatted():
    res = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "workflow"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda c: c["datasets"]["synthetic_llff"].update(preset="llff_265"), "preset"),
        (lambda c: c["datasets"]["synthetic_360"].update(stpes=5), "stpes"),
        (
            lambda c: c["datasets"]["synthetic_360"].update(overrides={"train.max_step": 3}),
            "train.max_step",
        ),
        (
            lambda c: c["datasets"]["synthetic_360"]["scenes"].update(bonsai={"factor": -1}),
            "factor",
        ),
        (lambda c: c["datasets"]["synthetic_360"]["source"].update(path="x"), "source"),
        (
            lambda c: c.update(
                archives={"a": {"url": "http://x/a.zip", "file": "a.zip", "sha256": "abc"}}
            ),
            "sha256",
        ),
    ],
)
def test_bad_config_fails_naming_the_key(tmp_path, mutate, expected):
    wd = workflow_copy(tmp_path)
    cfg = json.loads(json.dumps(TINY))
    mutate(cfg)
    write_config(wd / "bad.yaml", cfg)
    res, log = run(["-n", "--cores", "1", "--configfile", "bad.yaml"], wd)
    assert res.returncode != 0
    assert expected in log, log[-3000:]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    wd = workflow_copy(tmp_path_factory.mktemp("wf"))
    write_config(wd / "tiny.yaml", TINY)
    res, log = run(["--cores", "2", "--configfile", "tiny.yaml"], wd, timeout=175)
    assert res.returncode == 0, log[-5000:]
    return wd


@pytest.mark.slow
def test_end_to_end_tables(tiny_run):
    tables = tiny_run / "results" / "tables"
    for name in ("synthetic_360", "synthetic_llff", "combined"):
        for ext in ("csv", "md", "tex"):
            assert (tables / f"{name}.{ext}").stat().st_size > 0
    t360 = pd.read_csv(tables / "synthetic_360.csv", index_col="scene")
    assert list(t360.index) == ["bonsai", "garden", "mean"]
    pub = yaml.safe_load((REPO / "mipnerf360/published.yaml").read_text())["360"]["scenes"]
    for scene in ("bonsai", "garden"):
        m = json.loads(
            (tiny_run / f"results/evaluate/synthetic_360/{scene}/metrics.json").read_text()
        )
        s = json.loads((tiny_run / f"results/train/synthetic_360/{scene}/summary.json").read_text())
        row = t360.loc[scene]
        assert row["psnr"] == pytest.approx(m["psnr"], rel=1e-5) and math.isfinite(row["psnr"])
        assert row["ssim"] == pytest.approx(m["ssim"], rel=1e-5)
        assert row["pub_psnr"] == pub[scene]["psnr"]
        assert row["d_psnr"] == pytest.approx(m["psnr"] - pub[scene]["psnr"], rel=1e-5)
        assert row["steps"] == s["steps"] == TINY["datasets"]["synthetic_360"]["steps"]
        assert row["rays_per_s"] == pytest.approx(s["rays_per_s"], rel=1e-5)
        assert math.isnan(row["lpips"])  # LPIPS off in this config
    assert t360.loc["mean", "psnr"] == pytest.approx(t360.loc[["bonsai", "garden"], "psnr"].mean())
    llff = pd.read_csv(tables / "synthetic_llff.csv", index_col="scene")
    assert "pub_psnr" not in llff.columns and list(llff.index) == ["fern", "mean"]
    comb = pd.read_csv(tables / "combined.csv", index_col="dataset")
    assert comb.loc["synthetic_360", "scenes"] == 2
    assert (tiny_run / "results/benchmarks/train/synthetic_llff/fern.tsv").exists()
    for step in ("prepare", "train", "render", "evaluate"):
        assert (tiny_run / f"logs/{step}/synthetic_360/garden.log").exists()
    assert list((tiny_run / "results/train/synthetic_360/garden/checkpoints").iterdir())


@pytest.mark.slow
def test_nothing_to_do_after_a_run(tiny_run):
    assert dry_run_jobs(tiny_run, "--configfile", "tiny.yaml") == set()


@pytest.mark.slow
def test_scene_change_reruns_only_that_scene(tiny_run):
    cfg = json.loads(json.dumps(TINY))
    cfg["datasets"]["synthetic_360"]["scenes"]["garden"] = {
        "source": {"seed": 1},
        "overrides": {"train.lr_init": 0.004},
    }
    write_config(tiny_run / "scene_change.yaml", cfg)
    jobs = dry_run_jobs(tiny_run, "--configfile", "scene_change.yaml")
    assert jobs == {
        ("train", "synthetic_360", "garden"),
        ("render", "synthetic_360", "garden"),
        ("evaluate", "synthetic_360", "garden"),
        ("tables", "", ""),
        ("all", "", ""),
    }
    # and the rerun works: checkpoints of the old settings are not resumed
    res, log = run(["--cores", "2", "--configfile", "scene_change.yaml"], tiny_run, timeout=120)
    assert res.returncode == 0, log[-5000:]
    saved = yaml.safe_load(
        (tiny_run / "results/train/synthetic_360/garden/config.yaml").read_text()
    )
    assert saved["train"]["lr_init"] == 0.004


@pytest.mark.slow
def test_dataset_change_reruns_that_dataset(tiny_run):
    cfg = json.loads(json.dumps(TINY))
    cfg["datasets"]["synthetic_360"]["steps"] = 12
    write_config(tiny_run / "dataset_change.yaml", cfg)
    jobs = dry_run_jobs(tiny_run, "--configfile", "dataset_change.yaml")
    want = {
        (step, "synthetic_360", s)
        for step in ("train", "render", "evaluate")
        for s in ("bonsai", "garden")
    }
    assert jobs == want | {("tables", "", ""), ("all", "", "")}


@pytest.mark.slow
def test_report(tiny_run):
    res, log = run(["--configfile", "tiny.yaml", "--report", "report.html"], tiny_run)
    assert res.returncode == 0, log
    html = (tiny_run / "report.html").read_text()
    assert "synthetic_360.md" in html and "curves.png" in html
    res, log = run(["--configfile", "tiny.yaml", "--report", "report.zip"], tiny_run)
    assert res.returncode == 0, log
    with zipfile.ZipFile(tiny_run / "report.zip") as zf:
        names = zf.namelist()
    tables = {Path(n).name for n in names if n.endswith((".csv", ".md", ".tex"))}
    assert tables == {
        f"{t}.{e}"
        for t in ("synthetic_360", "synthetic_llff", "combined")
        for e in ("csv", "md", "tex")
    }
    assert sum(n.endswith("curves.png") for n in names) == 3  # one per scene
    views = list(tiny_run.glob("results/render/*/*/color/*.png"))
    pngs = [n for n in names if n.endswith(".png") and not n.endswith("curves.png")]
    assert views and len(pngs) == len(views)  # every test view


# ----------------------------------------------------------------------------- download rule


def _zip_folder(folder: Path, zip_path: Path, prefix: str) -> None:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"{prefix}/{p.relative_to(folder)}")


@pytest.mark.slow
def test_archive_source_download_and_offline(tmp_path):
    """An archive data set: the download rule fetches (local HTTP server), checks the pinned
    sha256 and extracts; prepare then reads the scene inside it. A second workflow with the
    archive already in resources/ and an unreachable URL works offline."""
    from mipnerf360 import synthetic

    synthetic.generate(tmp_path / "src" / "toy", "360", 8, 32, 24, 0, (2,))
    served = tmp_path / "served"
    served.mkdir()
    _zip_folder(tmp_path / "src", served / "toy_data.zip", "toy_data")
    sha = hashlib.sha256((served / "toy_data.zip").read_bytes()).hexdigest()

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        cfg = json.loads(json.dumps(TINY))
        cfg["archives"] = {
            "toy_data": {
                "url": f"http://127.0.0.1:{httpd.server_address[1]}/toy_data.zip",
                "file": "toy_data.zip",
                "sha256": sha,
            }
        }
        cfg["datasets"] = {
            "toys": {
                "dataset_type": "colmap",
                "source": {"archive": "toy_data", "subdir": "toy_data"},
                "preset": "tiny",
                "factor": 2,
                "scenes": {"toy": {}},
            }
        }
        target = "results/prepare/toys/toy/manifest.json"
        online = workflow_copy(tmp_path / "online")
        write_config(online / "c.yaml", cfg)
        res, log = run(["--cores", "1", target, "--configfile", "c.yaml"], online)
        assert res.returncode == 0, log
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "rule download" in log
    m = json.loads((online / target).read_text())
    assert m["num_images"] == 8 and m["factor"] == 2
    assert (online / "resources/data/toy_data/toy_data/toy/sparse/0").is_dir()
    assert (online / "resources/toy_data.zip").read_bytes() == (
        served / "toy_data.zip"
    ).read_bytes()

    offline = workflow_copy(tmp_path / "offline")
    (offline / "resources").mkdir()
    shutil.copy(served / "toy_data.zip", offline / "resources/toy_data.zip")
    cfg["archives"]["toy_data"]["url"] = "http://127.0.0.1:9/toy_data.zip"  # nothing there
    write_config(offline / "c.yaml", cfg)
    res, log = run(["--cores", "1", target, "--configfile", "c.yaml"], offline)
    assert res.returncode == 0, log
    assert "no download" in (offline / "logs/download/toy_data.log").read_text()

    # a wrong pinned checksum: the rule fails with the file named, nothing is extracted
    bad = workflow_copy(tmp_path / "bad")
    (bad / "resources").mkdir()
    shutil.copy(served / "toy_data.zip", bad / "resources/toy_data.zip")
    cfg["archives"]["toy_data"]["sha256"] = "0" * 64
    write_config(bad / "c.yaml", cfg)
    res, log = run(["--cores", "1", target, "--configfile", "c.yaml"], bad)
    assert res.returncode != 0
    assert "toy_data.zip: sha256 mismatch" in (bad / "logs/download/toy_data.log").read_text()
    assert not (bad / "resources/data/toy_data").exists()
