"""`mipnerf360 evaluate` on hand-made render folders."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_metrics import lpips_or_skip

from mipnerf360 import cli, configs, evaluate, io, metrics
from mipnerf360.errors import ConfigError, UserError


def _smooth_image(rng, h=64, w=80):
    """A smooth [H,W,3] image in [0.1, 0.9] (SSIM and PSNR are well defined on it)."""
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, size=3)
    img = 0.5 + 0.4 * np.sin(3 * x[..., None] + 2 * y[..., None] + phase)
    return img.astype(np.float32)


def _make_render_dir(root, n=2, noise=0.05, seed=0):
    """A folder laid out like `mipnerf360 render` writes it; returns (dir, preds, gts)."""
    rng = np.random.default_rng(seed)
    rd = os.path.join(root, "renders")
    os.makedirs(os.path.join(rd, "color"))
    os.makedirs(os.path.join(rd, "gt"))
    names, preds, gts = [], [], []
    for i in range(n):
        gt = io.to_uint8(_smooth_image(rng)).astype(np.float32) / 255
        pred = np.clip(gt + rng.normal(0, noise * (i + 1), gt.shape), 0, 1).astype(np.float32)
        name = f"view_{i:03d}"
        io.write_png(os.path.join(rd, "color", f"{name}.png"), pred)
        io.write_npy(os.path.join(rd, "gt", f"{name}.npy"), gt)
        names.append(name)
        preds.append(pred)
        gts.append(gt)
    with open(os.path.join(rd, "renders.json"), "w") as f:
        json.dump({"names": names}, f)
    return rd, preds, gts


def _psnr(pred, gt):
    q = np.round(pred.astype(np.float64) * 255) / 255
    return -10 * np.log10(np.mean((q - gt.astype(np.float64)) ** 2))


def test_evaluate_without_lpips_writes_json_and_csv(tmp_path):
    rd, preds, gts = _make_render_dir(str(tmp_path))
    out = tmp_path / "metrics"
    assert evaluate.main([rd, str(out), "--no-lpips"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_images"] == 2
    assert m["lpips"] == "off"
    assert m["lpips_alex"] is None and m["lpips_vgg"] is None
    expected = [_psnr(p, g) for p, g in zip(preds, gts, strict=True)]
    got = [r["psnr"] for r in m["images"]]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # The second image has twice the noise: lower PSNR and SSIM.
    assert got[0] > got[1] + 3
    assert m["images"][0]["ssim"] > m["images"][1]["ssim"]
    assert 0 < m["images"][1]["ssim"] < 1
    assert m["psnr"] == pytest.approx(np.mean(expected), abs=1e-4)
    assert m["ssim"] == pytest.approx(np.mean([r["ssim"] for r in m["images"]]))
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["view_000", "view_001"]
    assert float(rows[1]["psnr"]) == pytest.approx(expected[1], abs=1e-4)
    assert set(rows[0]) >= {"name", "psnr", "ssim", "lpips_alex", "lpips_vgg"}


def test_evaluate_with_lpips_alex(tmp_path):
    lpips_or_skip("alex")
    rd, _, _ = _make_render_dir(str(tmp_path))
    out = tmp_path / "metrics"
    assert evaluate.main([rd, str(out), "--lpips-nets", "alex"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["lpips"] == "on"
    assert m["lpips_vgg"] is None
    vals = [r["lpips_alex"] for r in m["images"]]
    assert all(v > 0 for v in vals)
    assert vals[1] > vals[0]  # more noise -> larger perceptual distance
    assert m["lpips_alex"] == pytest.approx(np.mean(vals))


def test_evaluate_lpips_off_from_config(tmp_path):
    rd, _, _ = _make_render_dir(str(tmp_path), n=1)
    cfg = configs.get_config("cpu", overrides=["eval.lpips=false"])
    configs.save_config(cfg, tmp_path / "config.yaml")
    out = tmp_path / "metrics"
    assert evaluate.main([rd, str(out), "--config", str(tmp_path / "config.yaml")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["lpips"] == "off" and m["num_images"] == 1


def test_evaluate_missing_render_dir_names_the_file(tmp_path):
    with pytest.raises(UserError, match="renders.json.*mipnerf360 render"):
        evaluate.main([str(tmp_path / "nope"), str(tmp_path / "out"), "--no-lpips"])


def test_evaluate_missing_image_names_the_file(tmp_path):
    rd, _, _ = _make_render_dir(str(tmp_path))
    os.remove(os.path.join(rd, "gt", "view_001.npy"))
    with pytest.raises(UserError, match="view_001.npy"):
        evaluate.main([rd, str(tmp_path / "out"), "--no-lpips"])


def test_evaluate_unknown_lpips_net_is_exit_2(tmp_path, capsys):
    rd, _, _ = _make_render_dir(str(tmp_path), n=1)
    assert cli.main(["evaluate", rd, str(tmp_path / "out"), "--lpips-nets", "squeeze"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "squeeze" in err[0] and "alex,vgg" in err[0]
    with pytest.raises(ConfigError, match="contradict"):
        evaluate.main([rd, str(tmp_path / "out"), "--no-lpips", "--lpips-nets", "alex"])


def test_png_roundtrip_is_the_metric_quantisation(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 1, (5, 7, 3)).astype(np.float32)
    path = str(tmp_path / "x.png")
    io.write_png(path, img)
    back = evaluate.read_png(path)
    np.testing.assert_array_equal(
        back, (np.round(img.astype(np.float64) * 255) / 255).astype(np.float32)
    )
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_metrics_json_has_every_registry_metric(tmp_path):
    rd, _, _ = _make_render_dir(str(tmp_path))
    out = tmp_path / "metrics"
    m = evaluate.evaluate_renders(rd, str(out), lpips=False)
    assert set(metrics.METRICS) <= set(m) and m["metrics"] == ["psnr", "ssim"]
    assert all(m[k] is None for k in metrics.METRICS if k not in ("psnr", "ssim"))
    with open(out / "metrics.csv") as f:
        assert next(csv.reader(f)) == ["name", *metrics.METRICS]


def test_evaluate_cc_metrics(tmp_path):
    """--cc adds multinerf's colour-corrected PSNR / SSIM, from the float render when the
    render folder has one (color/<name>.npy), as multinerf colour-corrects before quantising."""
    rng = np.random.default_rng(5)
    rd = os.path.join(tmp_path, "renders")
    gt = io.to_uint8(_smooth_image(rng)).astype(np.float32) / 255
    pred = np.clip(0.8 * gt + 0.15 + rng.normal(0, 0.01, gt.shape), 0, 1).astype(np.float32)
    io.write_png(os.path.join(rd, "color", "v.png"), pred)
    io.write_npy(os.path.join(rd, "color", "v.npy"), pred)
    io.write_npy(os.path.join(rd, "gt", "v.npy"), gt)
    io.write_json(os.path.join(rd, "renders.json"), {"names": ["v"]})
    out = tmp_path / "metrics"
    assert evaluate.main([rd, str(out), "--no-lpips", "--cc"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["metrics"] == ["psnr", "ssim", "cc_psnr", "cc_ssim"]
    assert m["color_correct"] is True and m["color_correct_input"] == "float"
    want = metrics.compute_metrics(pred, gt, lpips_nets=(), color_correct=True)
    assert m["cc_psnr"] == pytest.approx(want["cc_psnr"]) and m["psnr"] == pytest.approx(
        want["psnr"]
    )
    assert m["cc_psnr"] > m["psnr"] + 5
    # Without the float render it corrects the 8-bit PNG, and says so.
    os.remove(os.path.join(rd, "color", "v.npy"))
    m = evaluate.evaluate_renders(rd, str(out), lpips=False, color_correct=True)
    assert m["color_correct_input"] == "8-bit png" and m["cc_psnr"] > m["psnr"] + 5


def test_evaluate_takes_eval_overrides_only(tmp_path):
    rd, _, _ = _make_render_dir(str(tmp_path), n=1)
    out = tmp_path / "metrics"
    assert evaluate.main([rd, str(out), "--no-lpips", "eval.crop_borders=3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["crop_borders"] == 3
    # quantize_metrics=false reads nothing new here (no float render): still a valid run
    assert evaluate.main([rd, str(out), "eval.lpips=false", "eval.quantize_metrics=false"]) == 0
    assert json.loads((out / "metrics.json").read_text())["quantized"] is False
    with pytest.raises(ConfigError, match="train.max_steps"):
        evaluate.main([rd, str(out), "--no-lpips", "train.max_steps=3"])
    with pytest.raises(ConfigError, match="eval.crop_borders"):
        evaluate.main([rd, str(out), "--no-lpips", "eval.crop_borders=-1"])
    with pytest.raises(ConfigError, match="eval.nope"):
        evaluate.main([rd, str(out), "--no-lpips", "eval.nope=1"])


def test_size_mismatch_is_one_error_naming_both_files(tmp_path):
    rd, _, _ = _make_render_dir(str(tmp_path), n=1)
    gt = np.load(os.path.join(rd, "gt", "view_000.npy"))
    io.write_npy(os.path.join(rd, "gt", "view_000.npy"), gt[:-2])
    with pytest.raises(UserError, match=r"color/view_000.png.*80x64.*gt/view_000.npy.*80x62"):
        evaluate.main([rd, str(tmp_path / "out"), "--no-lpips"])


@pytest.mark.parametrize(
    "content", ["{not json", '{"names": "view_000"}', "[1, 2]", '{"names": []}', ""]
)
def test_corrupt_renders_json(tmp_path, content):
    rd, _, _ = _make_render_dir(str(tmp_path), n=1)
    with open(os.path.join(rd, "renders.json"), "w") as f:
        f.write(content)
    with pytest.raises(UserError, match="renders.json"):
        evaluate.main([rd, str(tmp_path / "out"), "--no-lpips"])


def test_lpips_on_small_images_is_one_error(tmp_path):
    rng = np.random.default_rng(6)
    rd = os.path.join(tmp_path, "renders")
    gt = rng.uniform(size=(24, 40, 3)).astype(np.float32)
    io.write_png(os.path.join(rd, "color", "v.png"), gt)
    io.write_npy(os.path.join(rd, "gt", "v.npy"), gt)
    io.write_json(os.path.join(rd, "renders.json"), {"names": ["v"]})
    with pytest.raises(UserError, match=r"40x24.*at least 32x32.*--no-lpips"):
        evaluate.main([rd, str(tmp_path / "out"), "--lpips-nets", "vgg"])
    assert evaluate.main([rd, str(tmp_path / "out"), "--no-lpips"]) == 0


def test_unwritable_output_names_the_path(tmp_path):
    """As root, chmod does not stop writes; an output 'folder' that is a file does."""
    rd, _, _ = _make_render_dir(str(tmp_path), n=1)
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(UserError, match=str(blocker)):
        evaluate.main([rd, str(blocker), "--no-lpips"])
    with pytest.raises(UserError, match="/proc/"):
        evaluate.main([rd, "/proc/mipnerf360-out", "--no-lpips"])


def test_cli_prints_one_line(tmp_path):
    rd, _, _ = _make_render_dir(str(tmp_path), n=1)
    with open(os.path.join(rd, "renders.json"), "w") as f:
        f.write("{truncated")
    r = subprocess.run(
        [sys.executable, "-m", "mipnerf360.cli", "evaluate", rd, str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "MIPNERF360_DEBUG"},
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("mipnerf360 evaluate: error: ") and "renders.json" in lines[0]
