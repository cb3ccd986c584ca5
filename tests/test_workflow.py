"""The Snakemake workflow: DAG over the paper configs (protocol, composition, ablation),
lint/format, config validation naming data set, scene, variant and key, an end-to-end run
of a tiny config with two variants (tables, report), rerun-only-what-changed (variant,
seed, eval settings, device, scene, data set) and the built-in ablation. Interruptions
and reruns of training: tests/test_workflow_runs.py."""

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

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import CPU_RESOURCES

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
# two of the paper's scenes) and one LLFF scene, two variants; tiny model, a few steps, no
# LPIPS, full resolution (data.factor 1: the tiny preset's own factor is 4).
TINY = {
    "device": "cpu",
    "metrics": {"lpips": False},
    "resources": CPU_RESOURCES,
    "variants": {
        "base": {"label": "Base"},
        "wide": {"label": "Wide NeRF MLP", "overrides": {"model.nerf_mlp.net_width": 48}},
    },
    "seeds": [0],
    "overrides": {
        "data.factor": 1,
        "train.batch_size": 128,
        "train.checkpoint_every": 5,
        "train.log_every": 5,
        "eval.chunk_size": 1024,
    },
    "datasets": {
        "synthetic_360": {
            "source": {"generate": "360", "views": 8, "width": 32, "height": 24, "seed": 0},
            "preset": "tiny",
            "steps": 10,
            "published": "360",
            "scenes": {"bonsai": {}, "garden": {"source": {"seed": 1}}},
        },
        "synthetic_llff": {
            "source": {"generate": "llff", "views": 8, "width": 32, "height": 24, "seed": 2},
            "preset": "tiny",
            "steps": 10,
            "variants": ["base"],
            "overrides": {
                "data.dataset_type": "llff",
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
TINY_RUNS = {
    ("synthetic_360", "bonsai", "base", "0"),
    ("synthetic_360", "bonsai", "wide", "0"),
    ("synthetic_360", "garden", "base", "0"),
    ("synthetic_360", "garden", "wide", "0"),
    ("synthetic_llff", "fern", "base", "0"),
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


def parse_jobs(log: str) -> set[tuple]:
    """{(rule, dataset, scene, variant, seed)} of the jobs in a snakemake log ('' when the
    rule has no such wildcard; download jobs carry the archive as dataset)."""
    jobs, rule, wc = set(), None, {}
    for line in log.splitlines() + ["rule end:"]:
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            if rule is not None:
                keys = (wc.get("dataset", wc.get("archive", "")), wc.get("scene", ""))
                jobs.add((rule, *keys, wc.get("variant", ""), wc.get("seed", "")))
            rule, wc = m.group(1), {}
        m = re.match(r"^\s+wildcards: (.*)$", line)
        if m and rule is not None:
            wc = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
    return jobs


def dry_run_jobs(cwd, *args) -> set[tuple]:
    """The jobs `snakemake -n` would run (see parse_jobs)."""
    res, log = run(["-n", "--cores", "1", *args], cwd)
    assert res.returncode == 0, log
    return parse_jobs(log)


def shell_commands(cwd, *args) -> list[str]:
    res, log = run(["-n", "-p", "--cores", "1", *args], cwd)
    assert res.returncode == 0, log
    return [line for line in log.splitlines() if line.startswith("Shell command: ")]


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tiny() -> dict:
    """A deep copy of TINY."""
    return json.loads(json.dumps(TINY))


def run_jobs(step, runs) -> set[tuple]:
    return {(step, *r) for r in runs}


TAIL = {("tables", "", "", "", ""), ("all", "", "", "", "")}


# ----------------------------------------------------------------------------- static


def test_paper_dag_has_every_scene_through_every_rule(tmp_path):
    wd = workflow_copy(tmp_path)
    jobs = dry_run_jobs(wd, "--configfile", "config/paper.yaml")
    counts = Counter(job[0] for job in jobs)
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
        got = {d: {s for r, d2, s, *_ in jobs if r == step and d2 == d} for d in PAPER_SCENES}
        assert got == PAPER_SCENES, step
    assert {d for r, d, *_ in jobs if r == "download"} == {
        "360_v2",
        "360_extra_scenes",
        "nerf_synthetic",
        "nerf_llff_data",
    }
    # no variants/seeds in the paper config: one variant 'baseline', the package's seed
    assert {(v, k) for r, _, _, v, k in jobs if r == "train"} == {("baseline", "20200823")}


@pytest.mark.parametrize(
    "name,runs",
    [
        ("mipnerf360", 9),
        ("mipnerf360_360gin", 9),
        ("llff", 8),
        ("blender", 8),
        ("config", 4),
        ("ablation_cpu", 4),
    ],
)
def test_each_config_dag(tmp_path, name, runs):
    wd = workflow_copy(tmp_path)
    jobs = dry_run_jobs(wd, "--configfile", f"config/{name}.yaml")
    for step in ("train", "render", "evaluate"):
        assert sum(j[0] == step for j in jobs) == runs


def test_paper_yaml_is_composed_not_copied():
    paper = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    assert set(paper) == {"include"}
    assert paper["include"] == [
        "config/mipnerf360.yaml",
        "config/llff.yaml",
        "config/blender.yaml",
    ]


def _factor(cmd: str) -> int:
    (f,) = re.findall(r" data\.factor=(\d+)", cmd)
    return int(f)


def test_paper_protocol_settings(tmp_path):
    """Presets, factors and 250k steps reach the commands: the mip-NeRF 360 outdoor scenes
    at images_4, the indoor ones at images_2 (prepare and train use the same value), LLFF
    at 4, Blender at full resolution; train asks for one GPU with the configured
    threads/memory/runtime."""
    wd = workflow_copy(tmp_path)
    res, log = run(["-n", "-p", "--cores", "1", "--configfile", "config/paper.yaml"], wd)
    assert res.returncode == 0, log
    train_cmds = [line for line in log.splitlines() if "mipnerf360 train " in line]
    prep_cmds = [line for line in log.splitlines() if "mipnerf360 prepare " in line]
    assert len(train_cmds) == 25 and len(prep_cmds) == 25
    presets = {"mipnerf360": "360", "llff": "llff_256", "blender": "blender_256"}
    indoor = {"room", "counter", "kitchen", "bonsai"}
    for d, scenes in PAPER_SCENES.items():
        for s in scenes:
            (cmd,) = [c for c in train_cmds if f"results/train/{d}/{s}/baseline/" in c]
            (prep,) = [c for c in prep_cmds if f"results/prepare/{d}/{s}/manifest.json" in c]
            assert f"--preset {presets[d]}" in cmd and f"--preset {presets[d]}" in prep
            assert "train.max_steps=250000" in cmd
            assert "--resume --restart-on-change" in cmd
            assert f"--manifest results/prepare/{d}/{s}/manifest.json" in cmd
            want = {"mipnerf360": 2 if s in indoor else 4, "llff": 4, "blender": 0}[d]
            assert _factor(cmd) == _factor(prep) == want, (d, s)
    train_res = [line for line in log.splitlines() if "resources:" in line and "gpu=1" in line]
    want = yaml.safe_load((REPO / "config/mipnerf360.yaml").read_text())["resources"]["train"]
    assert any(
        f"runtime={want['runtime']}" in r and f"mem_mb={want['mem_mb']}" in r for r in train_res
    )


def test_360gin_alternative_is_factor_4_for_all(tmp_path):
    wd = workflow_copy(tmp_path)
    cmds = shell_commands(wd, "--configfile", "config/mipnerf360_360gin.yaml")
    train = [c for c in cmds if "mipnerf360 train " in c]
    assert len(train) == 9 and {_factor(c) for c in train} == {4}


def test_ablation_plans_scenes_x_variants_x_seeds(tmp_path):
    wd = workflow_copy(tmp_path)
    cfg = yaml.safe_load((REPO / "config/ablation.yaml").read_text())
    variants, seeds = list(cfg["variants"]), [str(k) for k in cfg["seeds"]]
    assert len(variants) >= 5 and len(seeds) >= 2
    res, log = run(
        ["-n", "-p", "--cores", "1", "--configfile", "config/ablation.yaml"], wd, timeout=600
    )
    assert res.returncode == 0, log
    jobs = parse_jobs(log)
    want = {
        ("train", "mipnerf360", s, v, k)
        for s in PAPER_SCENES["mipnerf360"]
        for v in variants
        for k in seeds
    }
    assert {j for j in jobs if j[0] == "train"} == want
    cmds = [c for c in log.splitlines() if "mipnerf360 train " in c]
    for v, spec in cfg["variants"].items():
        mine = [c for c in cmds if f"/{v}/seed" in c]
        assert len(mine) == 9 * len(seeds)
        for key, value in (spec.get("overrides") or {}).items():
            shown = "null" if value is None else str(value)
            assert all(f"{key}={shown}" in c for c in mine), (v, key)
    for k in seeds:
        assert sum(f"train.seed={k} " in c for c in cmds) == 9 * len(variants)
    # the paper's Table 2 numbers are compared with the variants named like its rows
    pub = yaml.safe_load((REPO / "mipnerf360/published.yaml").read_text())
    for v, spec in cfg["variants"].items():
        for key in (spec.get("published") or {}).values():
            row = pub[key]["source"].split('"')[1]
            assert row == spec["label"], (v, row)


def test_schema_lists_agree_with_the_package():
    from mipnerf360 import configs, synthetic

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    defs = schema["definitions"]
    assert set(defs["preset"]["enum"]) == set(configs.PRESETS)
    assert set(defs["source"]["properties"]["generate"]["enum"]) == set(synthetic.KINDS)
    nets = schema["properties"]["metrics"]["properties"]["lpips_nets"]
    assert set(nets["items"]["enum"]) == set(configs.LPIPS_NETS)
    assert nets["default"] == list(configs.LPIPS_NETS)


def test_eval_settings_are_params_of_render_and_evaluate_only(tmp_path):
    wd = workflow_copy(tmp_path)
    write_config(wd / "tiny.yaml", TINY)
    cmds = shell_commands(wd, "--configfile", "tiny.yaml")
    train = [c for c in cmds if "mipnerf360 train " in c]
    later = [c for c in cmds if "mipnerf360 render " in c or "mipnerf360 evaluate " in c]
    assert len(train) == 5 and len(later) == 10
    assert not any("eval." in c for c in train)
    assert all("eval.chunk_size=1024" in c for c in later)
    assert all("--device cpu" in c for c in train if "mipnerf360 train" in c)


def test_gpus_of_a_train_job_are_data_parallel_processes(tmp_path):
    wd = workflow_copy(tmp_path)
    cfg = tiny()
    cfg["resources"]["train"]["gpu"] = 4
    write_config(wd / "gpus.yaml", cfg)
    train = [c for c in shell_commands(wd, "--configfile", "gpus.yaml") if " train " in c]
    assert train and all("--nproc-per-node 4" in c for c in train)
    cfg["resources"]["train"].update(gpu=0, processes=2)  # CPU processes (gloo)
    write_config(wd / "procs.yaml", cfg)
    train = [c for c in shell_commands(wd, "--configfile", "procs.yaml") if " train " in c]
    assert train and all("--nproc-per-node 2" in c for c in train)


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


def _ds(c):
    return c["datasets"]["synthetic_360"]


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda c: c["datasets"]["synthetic_llff"].update(preset="llff_265"), "preset"),
        (lambda c: _ds(c).update(stpes=5), "stpes"),
        (
            lambda c: _ds(c).update(overrides={"train.max_step": 3}),
            "datasets.synthetic_360.scenes.bonsai (variant base): unknown config key "
            "'train.max_step'",
        ),
        (
            lambda c: _ds(c)["scenes"].update(bonsai={"overrides": {"train.batch_size": 0}}),
            "datasets.synthetic_360.scenes.bonsai (variant base): train.batch_size must be >= 1",
        ),
        (
            lambda c: c["variants"]["wide"].update(overrides={"train.data_loss_type": "l1"}),
            "datasets.synthetic_360.scenes.bonsai (variant wide): train.data_loss_type: 'l1'",
        ),
        (
            lambda c: _ds(c)["scenes"].update(bonsai={"overrides": {"data.factor": -1}}),
            "datasets.synthetic_360.scenes.bonsai (variant base): data.factor must be >= 0",
        ),
        (lambda c: _ds(c).update(factor=2), "datasets.synthetic_360.factor: set it as overrides"),
        (
            lambda c: _ds(c).update(dataset_type="colmap"),
            "datasets.synthetic_360.dataset_type: set it as overrides",
        ),
        (
            lambda c: c["variants"]["wide"].update(overrides={"data.near": 0.5}),
            "variants.wide.overrides.data.near: a variant changes model",
        ),
        (
            lambda c: _ds(c).update(overrides={"train.seed": 3}),
            "train.seed: use the top-level `seeds:` list",
        ),
        (lambda c: _ds(c).update(variants=["nope"]), "synthetic_360.variants: ['nope'] not in"),
        (lambda c: c.update(seeds=[1, 1]), "seeds: repeated values"),
        (lambda c: _ds(c)["source"].update(path="x"), "source"),
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
    cfg = tiny()
    mutate(cfg)
    write_config(wd / "bad.yaml", cfg)
    res, log = run(["-n", "--cores", "1", "--configfile", "bad.yaml"], wd)
    assert res.returncode != 0
    assert expected in log, log[-3000:]


def test_include_merges_below_the_including_file(tmp_path):
    wd = workflow_copy(tmp_path)
    write_config(wd / "base.yaml", TINY)
    write_config(
        wd / "top.yaml",
        {"include": ["base.yaml"], "seeds": [0, 1], "datasets": {"synthetic_360": {"steps": 7}}},
    )
    cmds = shell_commands(wd, "--configfile", "top.yaml")
    train = [c for c in cmds if "mipnerf360 train " in c]
    assert len(train) == 10  # 5 runs x 2 seeds
    assert sum("train.max_steps=7 " in c for c in train) == 8  # synthetic_360 merged
    assert sum("train.max_steps=10 " in c for c in train) == 2  # llff kept


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    wd = workflow_copy(tmp_path_factory.mktemp("wf"))
    write_config(wd / "tiny.yaml", TINY)
    res, log = run(["--cores", "2", "--configfile", "tiny.yaml"], wd, timeout=400)
    assert res.returncode == 0, log[-5000:]
    return wd


def _train_log(wd, d, s, v, k=0) -> str:
    return (wd / f"logs/train/{d}/{s}/{v}/seed{k}.log").read_text()


@pytest.mark.slow
def test_end_to_end_tables(tiny_run):
    tables = tiny_run / "results" / "tables"
    for name in ("synthetic_360", "synthetic_llff", "combined"):
        for ext in ("csv", "md", "tex"):
            assert (tables / f"{name}.{ext}").stat().st_size > 0
    assert (tables / "synthetic_360_psnr.png").read_bytes()[:4] == b"\x89PNG"
    t360 = pd.read_csv(tables / "synthetic_360.csv", index_col="scene")
    assert list(t360.index) == ["bonsai", "garden", "mean"]
    pub = yaml.safe_load((REPO / "mipnerf360/published.yaml").read_text())["360"]["scenes"]
    long = pd.read_csv(tables / "runs.csv")
    for scene in ("bonsai", "garden"):
        for v in ("base", "wide"):
            run_dir = f"synthetic_360/{scene}/{v}/seed0"
            m = json.loads((tiny_run / f"results/evaluate/{run_dir}/metrics.json").read_text())
            s = json.loads((tiny_run / f"results/train/{run_dir}/summary.json").read_text())
            assert t360.loc[scene, f"{v}:psnr"] == pytest.approx(m["psnr"], rel=1e-5)
            assert math.isfinite(m["psnr"])
            assert t360.loc[scene, f"{v}:ssim"] == pytest.approx(m["ssim"], rel=1e-5)
            assert t360.loc[scene, f"{v}:steps"] == s["steps"] == 10
            sel = long[(long.scene == scene) & (long.variant == v) & (long.metric == "psnr")]
            assert sel["value"].tolist() == pytest.approx([m["psnr"]], rel=1e-6)
        # images at full resolution: not the published protocol, so no comparison
        assert t360.loc[scene, "images"] == "images"
        assert math.isnan(t360.loc[scene, "base:pub_psnr"])
        assert pub[scene]["psnr"] > 0
        assert t360.loc[scene, "wide:d_psnr"] == pytest.approx(
            t360.loc[scene, "wide:psnr"] - t360.loc[scene, "base:psnr"]
        )
    assert "not the published protocol" in (tables / "synthetic_360.md").read_text()
    llff = pd.read_csv(tables / "synthetic_llff.csv", index_col="scene")
    assert "base:pub_psnr" not in llff.columns and list(llff.index) == ["fern", "mean"]
    assert "wide:psnr" not in llff.columns  # narrowed to the base variant
    comb = pd.read_csv(tables / "combined.csv", index_col="dataset")
    assert comb.loc["synthetic_360", "scenes"] == 2
    assert (tiny_run / "results/benchmarks/train/synthetic_llff/fern/base/seed0.tsv").exists()
    for step in ("train", "render", "evaluate"):
        assert (tiny_run / f"logs/{step}/synthetic_360/garden/wide/seed0.log").exists()
    ckpts = tiny_run / "results/train/synthetic_360/garden/base/seed0/checkpoints"
    assert list(ckpts.iterdir())
    # the variant's setting reached its training only
    wide = yaml.safe_load(
        (tiny_run / "results/train/synthetic_360/garden/wide/seed0/config.yaml").read_text()
    )
    base = yaml.safe_load(
        (tiny_run / "results/train/synthetic_360/garden/base/seed0/config.yaml").read_text()
    )
    assert wide["model"]["nerf_mlp"]["net_width"] == 48
    assert base["model"]["nerf_mlp"]["net_width"] == 32
    assert base["train"]["seed"] == 0 and base["data"]["factor"] == 1


@pytest.mark.slow
def test_nothing_to_do_after_a_run(tiny_run):
    assert dry_run_jobs(tiny_run, "--configfile", "tiny.yaml") == set()


@pytest.mark.slow
def test_variant_change_reruns_only_that_variant(tiny_run):
    cfg = tiny()
    cfg["variants"]["wide"]["overrides"]["model.nerf_mlp.net_width"] = 40
    write_config(tiny_run / "variant_change.yaml", cfg)
    jobs = dry_run_jobs(tiny_run, "--configfile", "variant_change.yaml")
    wide = {r for r in TINY_RUNS if r[2] == "wide"}
    want = set()
    for step in ("train", "render", "evaluate"):
        want |= run_jobs(step, wide)
    assert jobs == want | TAIL
    # a label is a table matter only
    cfg = tiny()
    cfg["variants"]["wide"]["label"] = "Wider"
    write_config(tiny_run / "label_change.yaml", cfg)
    assert dry_run_jobs(tiny_run, "--configfile", "label_change.yaml") == TAIL


@pytest.mark.slow
def test_adding_a_seed_runs_only_the_new_seed(tiny_run):
    cfg = tiny()
    cfg["seeds"] = [0, 1]
    write_config(tiny_run / "two_seeds.yaml", cfg)
    jobs = dry_run_jobs(tiny_run, "--configfile", "two_seeds.yaml")
    new = {(d, s, v, "1") for d, s, v, _ in TINY_RUNS}
    want = set()
    for step in ("train", "render", "evaluate"):
        want |= run_jobs(step, new)
    assert jobs == want | TAIL


@pytest.mark.slow
def test_eval_change_reruns_render_and_evaluate_not_training(tiny_run):
    cfg = tiny()
    cfg["overrides"]["eval.chunk_size"] = 512
    write_config(tiny_run / "eval_change.yaml", cfg)
    jobs = dry_run_jobs(tiny_run, "--configfile", "eval_change.yaml")
    want = run_jobs("render", TINY_RUNS) | run_jobs("evaluate", TINY_RUNS)
    assert jobs == want | TAIL
    cfg = tiny()
    cfg["metrics"] = {"lpips": False, "lpips_nets": ["vgg"]}
    cfg["overrides"]["eval.crop_borders"] = 1
    write_config(tiny_run / "metrics_change.yaml", cfg)
    jobs = dry_run_jobs(tiny_run, "--configfile", "metrics_change.yaml")
    assert not {j for j in jobs if j[0] == "train"}


def test_key_order_is_not_a_setting(tmp_path):
    wd = workflow_copy(tmp_path)
    write_config(wd / "a.yaml", TINY)
    (wd / "b.yaml").write_text(yaml.safe_dump(TINY, sort_keys=True))
    a = shell_commands(wd, "--configfile", "a.yaml")
    b = shell_commands(wd, "--configfile", "b.yaml")
    assert sorted(a) == sorted(b)


@pytest.mark.slow
def test_device_change_reruns_nothing(tiny_run):
    cfg = tiny()
    cfg["device"] = "auto"
    write_config(tiny_run / "device_change.yaml", cfg)
    assert dry_run_jobs(tiny_run, "--configfile", "device_change.yaml") == set()


@pytest.mark.slow
def test_scene_change_reruns_only_that_scene_from_step_0(tiny_run):
    cfg = tiny()
    cfg["datasets"]["synthetic_360"]["scenes"]["garden"] = {
        "source": {"seed": 1},
        "overrides": {"train.lr_init": 0.004},
    }
    write_config(tiny_run / "scene_change.yaml", cfg)
    jobs = dry_run_jobs(tiny_run, "--configfile", "scene_change.yaml")
    garden = {r for r in TINY_RUNS if r[1] == "garden"}
    want = set()
    for step in ("train", "render", "evaluate"):
        want |= run_jobs(step, garden)
    assert jobs == want | TAIL
    # the rerun trains from step 0: the checkpoints of the old settings are not resumed,
    # they are moved to previous/ (Snakemake deletes the outputs of a job it reruns; the
    # old run's final checkpoint holds the same weights as its model.pt)
    out = tiny_run / "results/train/synthetic_360/garden/base/seed0"
    old_model = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    res, log = run(["--cores", "2", "--configfile", "scene_change.yaml"], tiny_run, timeout=300)
    assert res.returncode == 0, log[-5000:]
    train_log = _train_log(tiny_run, "synthetic_360", "garden", "base")
    assert "settings or data changed (train.lr_init: 0.002 -> 0.004)" in train_log
    assert "resumed from" not in train_log
    assert "fresh run: the previous run" in train_log
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].min() <= 5  # logged from the start, not from step 10
    (prev,) = list((out / "previous").iterdir())
    last = max((prev / "checkpoints").glob("ckpt_*.pt"), key=lambda p: int(p.stem[5:]))
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["step"] == old_model["step"] == 10
    for k, v in old_model["model"].items():
        assert torch.equal(state["model"][k], v), k
    new_model = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    assert not all(torch.equal(new_model["model"][k], v) for k, v in old_model["model"].items())
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["lr_init"] == 0.004


@pytest.mark.slow
def test_dataset_change_reruns_that_dataset(tiny_run):
    cfg = tiny()
    cfg["datasets"]["synthetic_360"]["steps"] = 12
    write_config(tiny_run / "dataset_change.yaml", cfg)
    jobs = dry_run_jobs(tiny_run, "--configfile", "dataset_change.yaml")
    runs = {r for r in TINY_RUNS if r[0] == "synthetic_360"}
    want = set()
    for step in ("train", "render", "evaluate"):
        want |= run_jobs(step, runs)
    assert jobs == want | TAIL


@pytest.mark.slow
def test_report(tiny_run):
    res, log = run(["--configfile", "tiny.yaml", "--report", "report.html"], tiny_run)
    assert res.returncode == 0, log
    html = (tiny_run / "report.html").read_text()
    assert "synthetic_360.md" in html and "curves.png" in html
    assert "synthetic_360_psnr.png" in html
    res, log = run(["--configfile", "tiny.yaml", "--report", "report.zip"], tiny_run)
    assert res.returncode == 0, log
    with zipfile.ZipFile(tiny_run / "report.zip") as zf:
        names = zf.namelist()
    tables = {Path(n).name for n in names if n.endswith((".csv", ".md", ".tex"))}
    assert tables == {
        f"{t}.{e}"
        for t in ("synthetic_360", "synthetic_llff", "combined")
        for e in ("csv", "md", "tex")
    } | {"runs.csv"}
    figures = {Path(n).name for n in names if n.endswith("_psnr.png")}
    assert figures == {"synthetic_360_psnr.png", "synthetic_llff_psnr.png"}
    assert sum(n.endswith("curves.png") for n in names) == 5  # one per run
    views = list(tiny_run.glob("results/render/*/*/*/*/color/*.png"))
    pngs = [n for n in names if n.endswith(".png") and not n.endswith(("curves.png", "_psnr.png"))]
    assert views and len(pngs) == len(views)  # every test view


@pytest.mark.slow
def test_built_in_ablation(tmp_path):
    """config/ablation_cpu.yaml: 2 variants x 2 seeds on the procedural 360 scene, the
    tables with mean +/- std and the delta column, and the PSNR figure."""
    wd = workflow_copy(tmp_path)
    res, log = run(["--cores", "2", "--configfile", "config/ablation_cpu.yaml"], wd, timeout=900)
    assert res.returncode == 0, log[-5000:]
    tables = wd / "results/tables"
    df = pd.read_csv(tables / "synthetic_360.csv", index_col="scene")
    long = pd.read_csv(tables / "runs.csv")
    psnr = long[long.metric == "psnr"].set_index(["variant", "seed"])["value"]
    assert len(psnr) == 4
    for v in ("complete", "B_no_Ldist"):
        vals = [psnr[(v, 0)], psnr[(v, 1)]]
        assert vals[0] != vals[1]  # two seeds, two trainings
        assert df.loc["procedural", f"{v}:psnr"] == pytest.approx(np.mean(vals))
        assert df.loc["procedural", f"{v}:psnr_std"] == pytest.approx(np.std(vals, ddof=1))
    d = [psnr[("B_no_Ldist", k)] - psnr[("complete", k)] for k in (0, 1)]
    assert df.loc["procedural", "B_no_Ldist:d_psnr"] == pytest.approx(np.mean(d))
    md = (tables / "synthetic_360.md").read_text()
    assert "B) No L_dist: Δ PSNR" in md and " ± " in md
    assert (tables / "synthetic_360_psnr.png").stat().st_size > 1000


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
                "source": {"archive": "toy_data", "subdir": "toy_data"},
                "preset": "tiny",
                "overrides": {"data.factor": 2},
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
