"""mipnerf360.tables: per-data-set and combined tables beside the published numbers."""

import json

import pandas as pd
import pytest

from mipnerf360 import tables


def write_scene(root, dataset, scene, psnr, ssim, lpips_vgg, wall=120.0, rays=5000.0):
    ev = root / "evaluate" / dataset / scene
    tr = root / "train" / dataset / scene
    ev.mkdir(parents=True)
    tr.mkdir(parents=True)
    metrics = {
        "num_images": 3,
        "psnr": psnr,
        "ssim": ssim,
        "lpips_alex": None,
        "lpips_vgg": lpips_vgg,
        "lpips": "on" if lpips_vgg is not None else "off",
    }
    (ev / "metrics.json").write_text(json.dumps(metrics))
    summary = {
        "wall_time_s": wall,
        "steps": 100,
        "steps_per_s": 1.0,
        "rays_per_s": rays,
        "peak_memory_mb": 321.0,
        "device": "cpu",
    }
    (tr / "summary.json").write_text(json.dumps(summary))


def test_published_file_has_every_scene_and_consistent_means():
    pub = tables.load_published()
    assert len(pub["360"]["scenes"]) == 9
    for key in ("blender_256", "blender_512", "llff_256", "llff_512"):
        assert len(pub[key]["scenes"]) == 8
    for key, entry in pub.items():
        for m in ("psnr", "ssim", "lpips"):
            mean = sum(s[m] for s in entry["scenes"].values()) / len(entry["scenes"])
            assert mean == pytest.approx(entry["mean"][m], abs=0.006), (key, m)


def test_dataset_table_with_published_and_differences(tmp_path):
    pub = tables.load_published()["360"]["scenes"]
    write_scene(tmp_path, "m360", "bicycle", 23.0, 0.60, 0.35, wall=600.0)
    write_scene(tmp_path, "m360", "garden", 25.5, 0.70, 0.25, wall=1200.0)
    write_scene(tmp_path, "toy", "a", 30.0, 0.9, None)
    out = tmp_path / "tables"
    t = tables.make_tables(
        tmp_path, out, [("m360", "bicycle"), ("m360", "garden"), ("toy", "a")], {"m360": "360"}
    )
    df = t["m360"]
    assert list(df.index) == ["bicycle", "garden", "mean"]
    assert df.loc["bicycle", "pub_psnr"] == pub["bicycle"]["psnr"]
    assert df.loc["garden", "d_ssim"] == pytest.approx(0.70 - pub["garden"]["ssim"])
    assert df.loc["mean", "psnr"] == pytest.approx((23.0 + 25.5) / 2)
    assert df.loc["mean", "train_time_min"] == pytest.approx(15.0)
    assert df.loc["mean", "d_lpips"] == pytest.approx(
        (0.35 + 0.25) / 2 - (pub["bicycle"]["lpips"] + pub["garden"]["lpips"]) / 2
    )
    # a data set without published numbers, and LPIPS off -> NaN, shown as a dash
    assert "pub_psnr" not in t["toy"].columns
    assert pd.isna(t["toy"].loc["a", "lpips"])
    assert "–" in (out / "toy.md").read_text()
    # files: csv round-trips, md and tex carry the rows
    for name in ("m360", "toy", "combined"):
        for ext in ("csv", "md", "tex"):
            assert (out / f"{name}.{ext}").stat().st_size > 0
    back = pd.read_csv(out / "m360.csv", index_col="scene")
    assert back.loc["garden", "psnr"] == pytest.approx(25.5)
    md = (out / "m360.md").read_text()
    assert "| bicycle |" in md and "**mean**" in md and "Δ PSNR" in md
    tex = (out / "m360.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\Delta$ PSNR" in tex and "bicycle" in tex
    comb = t["combined"]
    assert list(comb.index) == ["m360", "toy"]
    assert comb.loc["m360", "scenes"] == 2
    assert comb.loc["toy", "psnr"] == pytest.approx(30.0)


def test_missing_metrics_file_is_named(tmp_path, capsys):
    write_scene(tmp_path, "d", "a", 20.0, 0.5, 0.3)
    rc = tables.main([str(tmp_path / "t"), "d/a", "d/b", "--results", str(tmp_path)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "evaluate/d/b/metrics.json: not found" in err


def test_cli_as_the_workflow_calls_it(tmp_path, capsys):
    write_scene(tmp_path, "a", "x", 20.0, 0.5, 0.3)
    write_scene(tmp_path, "b", "bonsai", 30.0, 0.9, 0.2)
    out = tmp_path / "t"
    args = [str(out), "--results", str(tmp_path), "a/x", "b/bonsai", "--published", "b=360"]
    assert tables.main(args) == 0
    df = pd.read_csv(out / "b.csv", index_col="scene")
    pub = tables.load_published()["360"]["scenes"]["bonsai"]
    assert df.loc["bonsai", "d_psnr"] == pytest.approx(30.0 - pub["psnr"])
    assert "pub_psnr" not in pd.read_csv(out / "a.csv").columns


def test_bad_arguments(tmp_path, capsys):
    write_scene(tmp_path, "d", "a", 20.0, 0.5, 0.3)
    assert tables.main([str(tmp_path / "t"), "d-a", "--results", str(tmp_path)]) == 1
    assert "DATASET/SCENE" in capsys.readouterr().err
    args = [str(tmp_path / "t"), "d/a", "--results", str(tmp_path), "--published", "d=nope"]
    assert tables.main(args) == 1
    assert "no published numbers for 'nope'" in capsys.readouterr().err


def test_corrupt_summary_is_named(tmp_path):
    write_scene(tmp_path, "d", "a", 20.0, 0.5, 0.3)
    (tmp_path / "train/d/a/summary.json").write_text("{not json")
    with pytest.raises(tables.TablesError, match=r"train/d/a/summary.json: not valid JSON"):
        tables.make_tables(tmp_path, tmp_path / "t", [("d", "a")])
