"""`mipnerf360 evaluate` on hand-made render folders, and the render-side image helpers."""

import csv
import json
import os

import numpy as np
import pytest

from mipnerf360 import configs, evaluate


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
        gt = evaluate.to_uint8(_smooth_image(rng)).astype(np.float32) / 255
        pred = np.clip(gt + rng.normal(0, noise * (i + 1), gt.shape), 0, 1).astype(np.float32)
        name = f"view_{i:03d}"
        evaluate.write_png(os.path.join(rd, "color", f"{name}.png"), pred)
        evaluate.write_npy(os.path.join(rd, "gt", f"{name}.npy"), gt)
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
    assert evaluate.evaluate_main([rd, str(out), "--no-lpips"]) == 0
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
    rd, _, _ = _make_render_dir(str(tmp_path))
    out = tmp_path / "metrics"
    assert evaluate.evaluate_main([rd, str(out), "--lpips-nets", "alex"]) == 0
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
    assert evaluate.evaluate_main([rd, str(out), "--config", str(tmp_path / "config.yaml")]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["lpips"] == "off" and m["num_images"] == 1


def test_evaluate_missing_render_dir_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="renders.json"):
        evaluate.evaluate_main([str(tmp_path / "nope"), str(tmp_path / "out"), "--no-lpips"])


def test_evaluate_missing_image_names_the_file(tmp_path):
    rd, _, _ = _make_render_dir(str(tmp_path))
    os.remove(os.path.join(rd, "gt", "view_001.npy"))
    with pytest.raises(FileNotFoundError, match="view_001.npy"):
        evaluate.evaluate_main([rd, str(tmp_path / "out"), "--no-lpips"])


def test_evaluate_unknown_lpips_net_is_exit_2(tmp_path, capsys):
    rd, _, _ = _make_render_dir(str(tmp_path), n=1)
    assert evaluate.evaluate_main([rd, str(tmp_path / "out"), "--lpips-nets", "squeeze"]) == 2
    assert "squeeze" in capsys.readouterr().err


def test_png_roundtrip_is_the_metric_quantisation(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 1, (5, 7, 3)).astype(np.float32)
    path = str(tmp_path / "x.png")
    evaluate.write_png(path, img)
    back = evaluate.read_png(path)
    np.testing.assert_array_equal(
        back, (np.round(img.astype(np.float64) * 255) / 255).astype(np.float32)
    )
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_colorize_depth_orders_near_and_far():
    depth = np.tile(np.linspace(1.0, 10.0, 16, dtype=np.float32), (4, 1))
    rgb = evaluate.colorize_depth(depth)
    assert rgb.shape == (4, 16, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert not np.allclose(rgb[:, 0], rgb[:, -1])  # near and far differ
    # No accumulation -> white background.
    np.testing.assert_allclose(evaluate.colorize_depth(depth, np.zeros_like(depth)), 1.0)


def test_render_writes_every_view(tmp_path):
    """Render a 2-step model's test views: file layout, shapes and the ground truth."""
    import torch

    from mipnerf360 import datasets, synthetic, train

    scene = synthetic.generate(tmp_path / "scene", kind="360", n_views=9, width=40, height=32)
    run, out = tmp_path / "run", tmp_path / "renders"
    small = ["train.max_steps=2", "train.batch_size=32", "model.num_prop_samples=8"]
    small += ["model.num_nerf_samples=8", "model.nerf_mlp.net_width=32", "eval.chunk_size=500"]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main([scene, str(run), "--preset", "cpu", "--no-progress", *small]) == 0
        assert evaluate.render_main([str(run), scene, str(out), "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(old)
    info = json.loads((out / "renders.json").read_text())
    sc = datasets.load_scene(scene, configs.load_config(run / "config.yaml").data)
    assert info["names"] == [os.path.splitext(sc.names[i])[0] for i in sc.i_test]
    assert info["step"] == 2 and len(info["seconds_per_image"]) == len(sc.i_test)
    for name, i in zip(info["names"], sc.i_test, strict=True):
        np.testing.assert_array_equal(np.load(out / "gt" / f"{name}.npy"), sc.images[i])
        assert evaluate.read_png(str(out / "color" / f"{name}.png")).shape == (32, 40, 3)
        depth = np.load(out / "depth" / f"{name}.npy")
        assert depth.shape == (32, 40) and np.isfinite(depth).all() and (depth > 0).all()
        assert evaluate.read_png(str(out / "depth" / f"{name}.png")).shape == (32, 40, 3)
        assert evaluate.read_png(str(out / "acc" / f"{name}.png")).shape == (32, 40, 3)
