"""mipnerf360.tables: variants x seeds, statistics, published numbers and protocols."""

import dataclasses
import json
import math
import os
import stat

import numpy as np
import pandas as pd
import pytest
import yaml

from mipnerf360 import cli, metrics, tables


def write_run(root, d, s, v, k, psnr, ssim, lpips_vgg=None, factor=4, wall=120.0, extra=None):
    run = f"{d}/{s}/{v}/seed{k}"
    ev, tr = root / "evaluate" / run, root / "train" / run
    ev.mkdir(parents=True)
    tr.mkdir(parents=True)
    m = {"num_images": 3, "psnr": psnr, "ssim": ssim, "lpips_vgg": lpips_vgg, **(extra or {})}
    (ev / "metrics.json").write_text(json.dumps(m))
    summary = {
        "wall_time_s": wall,
        "steps": 100,
        "rays_per_s": 5000.0,
        "peak_memory_mb": 321.0,
        "precision": "bf16" if v == "small" else "fp32",
        "compiled": True,
        "device": "cuda:0",
        "world_size": 2,
        "torch_version": "2.14.1",
    }
    (tr / "summary.json").write_text(json.dumps(summary))
    (tr / "config.yaml").write_text(yaml.safe_dump({"data": {"factor": factor}}))
    return (d, s, v, k)


def test_published_file_has_every_scene_consistent_means_and_a_protocol():
    pub = tables.load_published()
    assert len(pub["360"]["scenes"]) == 9
    for key in ("blender_256", "blender_512", "llff_256", "llff_512"):
        assert len(pub[key]["scenes"]) == 8
    for key, entry in pub.items():
        for m in ("psnr", "ssim", "lpips"):
            mean = sum(s[m] for s in entry["scenes"].values()) / len(entry["scenes"])
            assert mean == pytest.approx(entry["mean"][m], abs=0.006), (key, m)
        for scene in entry["scenes"]:
            assert tables.published_factor(entry, scene) in (1, 2, 4), (key, scene)
        assert entry["train_time_h"] > 0  # shown in the tables' notes
    # the paper protocol: outdoor at 1/4, indoor at 1/2
    f = {s: tables.published_factor(pub["360"], s) for s in pub["360"]["scenes"]}
    assert {s for s, x in f.items() if x == 2} == {"room", "counter", "kitchen", "bonsai"}
    assert {s for s, x in f.items() if x == 4} == {
        "bicycle",
        "flowers",
        "garden",
        "stump",
        "treehill",
    }
    # the paper's Table 2 (ablation, bicycle only)
    assert pub["360_table2_B"]["scenes"] == {
        "bicycle": {"psnr": 24.41, "ssim": 0.687, "lpips": 0.3}
    }


def test_published_keys_are_metric_registry_keys():
    keys = {m.published_key for m in metrics.METRICS.values() if m.published_key}
    for key, entry in tables.load_published().items():
        for scene, values in entry["scenes"].items():
            assert set(values) == keys, (key, scene)


@pytest.fixture
def ablation(tmp_path):
    """Two variants x two seeds on three scenes; 'small' is 1 dB worse on every scene and
    seed (plus noise), 'noise' differs from the baseline by +-0.01 dB only."""
    runs = []
    base = {"bicycle": 24.0, "garden": 26.0, "room": 30.0}
    rng = np.random.default_rng(0)
    for s, b in base.items():
        factor = 2 if s == "room" else 4
        for k in (0, 1):
            p = b + 0.1 * k
            runs.append(write_run(tmp_path, "m360", s, "full", k, p, 0.80, 0.30, factor))
            runs.append(
                write_run(
                    tmp_path, "m360", s, "small", k, p - 1.0 + 0.01 * rng.standard_normal(),
                    0.70, 0.40, factor,
                )
            )  # fmt: skip
            runs.append(
                write_run(
                    tmp_path, "m360", s, "noise", k, p + (0.01 if k else -0.01), 0.80, 0.30,
                    factor,
                )
            )  # fmt: skip
    runs.append(write_run(tmp_path, "toy", "a", "full", 0, 30.0, 0.9, None, 1))
    runs.append(write_run(tmp_path, "toy", "a", "small", 0, 29.0, 0.9, None, 1))
    spec = tables.Spec(
        runs=runs,
        baseline="full",
        labels={"full": "Our Complete Model", "small": "F) Small NeRF MLP"},
        published={"full": {"m360": "360"}, "small": {"m360": "360_table2_F"}},
    )
    return tmp_path, spec


def test_statistics_deltas_and_significance(ablation):
    root, spec = ablation
    out = root / "tables"
    t = tables.make_tables(root, out, spec)
    df = t["m360"]
    assert list(df.index) == ["bicycle", "garden", "room", "mean"]
    assert df.loc["bicycle", "full:psnr"] == pytest.approx(24.05)
    assert df.loc["bicycle", "full:psnr_std"] == pytest.approx(np.std([24.0, 24.1], ddof=1))
    assert df.loc["mean", "full:psnr"] == pytest.approx((24.05 + 26.05 + 30.05) / 3)
    # std of the mean row: over seeds of the per-seed scene mean
    assert df.loc["mean", "full:psnr_std"] == pytest.approx(
        np.std([(24 + 26 + 30) / 3, (24.1 + 26.1 + 30.1) / 3], ddof=1)
    )
    # 1 dB worse everywhere: significant per scene (over seeds) and overall (over scenes)
    assert df.loc["bicycle", "small:d_psnr"] == pytest.approx(-1.0, abs=0.03)
    assert df.loc["bicycle", "small:d_psnr_sig"]
    assert df.loc["mean", "small:d_psnr"] == pytest.approx(-1.0, abs=0.03)
    assert df.loc["mean", "small:d_psnr_sig"]
    assert df.loc["mean", "small:d_lpips_vgg"] == pytest.approx(0.1)
    # +-0.01 dB: no difference beyond noise
    assert abs(df.loc["mean", "noise:d_psnr"]) < 1e-9
    assert not df.loc["bicycle", "noise:d_psnr_sig"] and not df.loc["mean", "noise:d_psnr_sig"]
    # the baseline has no delta columns
    assert "full:d_psnr" not in df.columns
    # toy: one seed -> no std, no significance possible
    toy = t["toy"]
    assert math.isnan(toy.loc["a", "full:psnr_std"])
    assert not toy.loc["a", "small:d_psnr_sig"]
    assert "full:lpips_vgg" not in toy.columns  # LPIPS off in every toy run


def test_paired_delta_threshold():
    # mean 1, sample std 2/sqrt(3), n 4 -> 2 SE = 1.155 > 1: not significant
    assert tables.paired_delta([0.0, 0.0, 2.0, 2.0]) == (1.0, False)
    # mean 1, sample std 0.408 -> 2 SE = 0.408 < 1: significant
    assert tables.paired_delta([0.5, 1.0, 1.0, 1.5]) == (1.0, True)
    assert tables.paired_delta([1.0]) == (1.0, False)
    m, sig = tables.paired_delta([])
    assert math.isnan(m) and not sig


def test_published_only_for_rows_of_the_published_protocol(ablation):
    root, spec = ablation
    # garden at images_2: not the published images_4
    cfg = root / "train/m360/garden/full/seed0/config.yaml"
    for v in ("full", "small", "noise"):
        for k in (0, 1):
            (root / f"train/m360/garden/{v}/seed{k}/config.yaml").write_text(
                yaml.safe_dump({"data": {"factor": 2}})
            )
    assert cfg.exists()
    out = root / "tables"
    t = tables.make_tables(root, out, spec)
    df = t["m360"]
    pub = tables.load_published()
    assert df.loc["bicycle", "full:pub_psnr"] == pub["360"]["scenes"]["bicycle"]["psnr"]
    assert df.loc["room", "full:pub_psnr"] == pub["360"]["scenes"]["room"]["psnr"]  # images_2
    assert math.isnan(df.loc["garden", "full:pub_psnr"])
    assert math.isnan(df.loc["mean", "full:pub_psnr"])  # not every row comparable
    assert df.loc["bicycle", "small:pub_psnr"] == pub["360_table2_F"]["scenes"]["bicycle"]["psnr"]
    assert math.isnan(df.loc["room", "small:pub_psnr"])  # Table 2 has bicycle only
    assert df.loc["garden", "images"] == "images_2"
    md = (out / "m360.md").read_text()
    assert "images_2 †" in md and "garden (images_2, published images_4)" in md
    assert "outdoor scenes images_4, indoor scenes images_2" in md
    assert "6.42 h per scene" in md  # published train_time_h


def test_every_protocol_row_compared(ablation):
    root, spec = ablation
    t = tables.make_tables(root, root / "tables", spec)
    pub = tables.load_published()["360"]["scenes"]
    df = t["m360"]
    want = np.mean([pub[s]["psnr"] for s in ("bicycle", "garden", "room")])
    assert df.loc["mean", "full:pub_psnr"] == pytest.approx(want)
    assert "Every row used the published protocol" in (root / "tables/m360.md").read_text()


def test_long_csv_keeps_every_per_seed_value(ablation):
    root, spec = ablation
    tables.make_tables(root, root / "tables", spec)
    long = pd.read_csv(root / "tables/runs.csv")
    assert list(long.columns) == ["dataset", "scene", "variant", "seed", "metric", "value"]
    psnr = long[(long.metric == "psnr") & (long.dataset == "m360")]
    assert len(psnr) == 3 * 3 * 2
    got = psnr.set_index(["scene", "variant", "seed"])["value"]
    assert got[("garden", "full", 1)] == pytest.approx(26.1)
    assert got[("room", "noise", 0)] == pytest.approx(29.99)
    assert set(long.metric) >= {"psnr", "ssim", "lpips_vgg", "train_time_min", "rays_per_s"}


def test_markdown_latex_and_figure(ablation):
    root, spec = ablation
    out = root / "tables"
    tables.make_tables(root, out, spec)
    md = (out / "m360.md").read_text()
    assert "| Our Complete Model: PSNR |" in md and "F) Small NeRF MLP: Δ PSNR" in md
    assert "| bicycle | images_4 |" in md and "**mean**" in md
    assert "24.05 ± 0.07" in md
    assert "Δ PSNR" in md and "-1.00*" in md  # significant delta marked
    assert "F) Small NeRF MLP" in md and "pub. PSNR" in md
    tex = (out / "m360.tex").read_text()
    assert r"\multicolumn" in tex and r"Our Complete Model" in tex
    assert r"\textbf{24.05 $\pm$ 0.07}" in tex  # best PSNR of the row in bold
    assert r"$^{*}$" in tex
    # paper layout: one row per variant, best per column bold
    assert r"\textbf{26.72 $\pm$ 0.07}" in tex
    png = (out / "m360_psnr.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    comb = pd.read_csv(out / "combined.csv", index_col="dataset")
    assert list(comb.index) == ["m360", "toy"]
    assert comb.loc["m360", "scenes"] == 3
    assert comb.loc["toy", "full:psnr"] == pytest.approx(30.0)
    assert "F) Small NeRF MLP" in (out / "combined.tex").read_text()


def test_a_new_metric_is_one_registry_entry(ablation, monkeypatch):
    root, spec = ablation
    new = dataclasses.replace(
        metrics.METRICS["psnr"], name="psnr_x", label="PSNR-X", option="color_correct"
    )
    monkeypatch.setitem(metrics.METRICS, "psnr_x", new)
    (root / "evaluate/toy/a/full/seed0/metrics.json").write_text(
        json.dumps({"psnr": 30.0, "ssim": 0.9, "psnr_x": 31.5})
    )
    out = root / "tables"
    t = tables.make_tables(root, out, spec)
    assert t["toy"].loc["a", "full:psnr_x"] == 31.5
    assert "PSNR-X" in (out / "toy.md").read_text()


def test_provenance_prints_pinned_and_recorded_hashes(ablation):
    root, spec = ablation
    rec = root / "360_v2.zip.sha256"
    rec.write_text("ab" * 32 + "  360_v2.zip\n")
    spec.archives = {
        "360_v2": {"url": "http://x/360_v2.zip", "sha256": None, "record": str(rec),
                   "datasets": ["m360"]},
        "pinned": {"url": "http://x/p.zip", "sha256": "cd" * 32, "record": "nope",
                   "datasets": ["m360"]},
        "other": {"url": "http://x/o.zip", "sha256": None, "record": str(root / "missing"),
                  "datasets": ["toy"]},
    }  # fmt: skip
    out = root / "tables"
    tables.make_tables(root, out, spec)
    md = (out / "m360.md").read_text()
    assert f"sha256 {'ab' * 32} (not pinned; recorded" in md
    assert f"sha256 {'cd' * 32} (pinned)" in md
    assert "other" not in md  # another data set's archive
    assert "not pinned and not recorded" in (out / "combined.md").read_text()


def test_provenance_names_how_the_runs_were_trained(ablation):
    root, spec = ablation
    tables.make_tables(root, root / "tables", spec)
    md = (root / "tables" / "m360.md").read_text()
    common = "compiled, cuda:0 x 2 process(es), torch 2.14.1"
    assert f"Trained with precision fp32, {common}: 12 run(s)." in md
    assert f"Trained with precision bf16, {common}: 6 run(s)." in md
    combined = (root / "tables" / "combined.md").read_text()  # m360 + toy's 2 runs
    assert f"Trained with precision fp32, {common}: 13 run(s)." in combined
    assert f"Trained with precision bf16, {common}: 7 run(s)." in combined


def test_outputs_get_the_umask_permissions(ablation):
    root, spec = ablation
    old = os.umask(0o022)
    try:
        tables.make_tables(root, root / "tables", spec, figures=False)
    finally:
        os.umask(old)
    for name in ("m360.md", "m360.csv", "combined.tex", "runs.csv"):
        assert stat.S_IMODE((root / "tables" / name).stat().st_mode) == 0o644, name


def test_cli_runs_and_published(tmp_path, capsys):
    write_run(tmp_path, "a", "x", "baseline", 0, 20.0, 0.5, 0.3, 1)
    write_run(tmp_path, "b", "bonsai", "baseline", 0, 30.0, 0.9, 0.2, 2)
    out = tmp_path / "t"
    args = ["tables", str(out), "--results", str(tmp_path), "--no-figures"]
    args += ["a/x/baseline/seed0", "b/bonsai/baseline/seed0", "--published", "b=360"]
    assert cli.main(args) == 0
    df = pd.read_csv(out / "b.csv", index_col="scene")
    pub = tables.load_published()["360"]["scenes"]["bonsai"]
    assert df.loc["bonsai", "baseline:pubd_psnr"] == pytest.approx(30.0 - pub["psnr"])
    assert "baseline:pub_psnr" not in pd.read_csv(out / "a.csv").columns
    assert not (out / "a_psnr.png").exists()


def test_cli_spec_as_the_workflow_writes_it(tmp_path):
    runs = [write_run(tmp_path, "d", "s", v, k, 20.0 + k, 0.5, None, 1) for v in ("b", "v")
            for k in (3, 4)]  # fmt: skip
    spec = {
        "runs": [list(r) for r in runs],
        "baseline": "b",
        "variants": {"b": {"label": "Base"}, "v": {"label": "Var"}},
        "archives": {},
    }
    out = tmp_path / "t"
    argv = ["tables", str(out), "--results", str(tmp_path), "--spec", json.dumps(spec)]
    assert cli.main(argv) == 0
    df = pd.read_csv(out / "d.csv", index_col="scene")
    assert df.loc["s", "b:psnr"] == pytest.approx(23.5) and "v:d_psnr" in df.columns
    assert (out / "d_psnr.png").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["d-a"], "DATASET/SCENE/VARIANT/seedK"),
        (["d/a/b/seedx"], "is not seed<integer>"),
        (["d/a/b/seed0", "--published", "d=nope"], "no published numbers for 'nope'"),
        (["d/a/b/seed0", "--published", "e=360"], "no runs of data set 'e'"),
        (["d/a/b/seed1"], "evaluate/d/a/b/seed1/metrics.json: not found (has that step run?)"),
        (["--spec", "{bad"], "--spec: not valid JSON"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    write_run(tmp_path, "d", "a", "b", 0, 20.0, 0.5, 0.3)
    rc = cli.main(["tables", str(tmp_path / "t"), "--results", str(tmp_path), *argv])
    assert rc == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("mipnerf360 tables: error:") and err.count("\n") == 1


def test_corrupt_summary_is_named(tmp_path):
    run = write_run(tmp_path, "d", "a", "b", 0, 20.0, 0.5, 0.3)
    (tmp_path / "train/d/a/b/seed0/summary.json").write_text("{not json")
    spec = tables.Spec(runs=[run], baseline="b")
    with pytest.raises(tables.TablesError, match=r"train/d/a/b/seed0/summary.json: not valid JSON"):
        tables.make_tables(tmp_path, tmp_path / "t", spec)
